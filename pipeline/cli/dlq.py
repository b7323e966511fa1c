"""``pipeline dlq``: inspect, export, replay and purge dead letters (see :mod:`dlq.store`).

Registered on the ``pipeline`` group at the end of :mod:`pipeline.cli`. This
module does not import :mod:`pipeline.cli` at import time: that module imports
this one, and under ``python -m pipeline.cli`` the import would be circular.

Every option is validated before the broker is contacted: a bad reason, a time
without a timezone, a malformed REF or export file name exits 2 with one line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from dlq import export, original, purge, read, redrive, summary, view
from dlq.reasons import FRAMEWORK
from pipeline.cli.common import cell, clean, handle_errors, print_table, settings_from
from pipeline.settings import Settings
from pipeline.timeparse import parse_instant, to_ms

F = TypeVar("F", bound=Callable[..., Any])

_MESSAGE_WIDTH = 60


def _short(text: str | None, width: int = _MESSAGE_WIDTH) -> str:
    if text is None:
        return "-"
    line = clean(text)
    return line if len(line) <= width else line[: width - 1] + "…"


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _original(letter: read.StoredDeadLetter) -> str:
    def part(value: Any) -> str:
        return "?" if value is None else str(value)

    return (
        f"{part(letter.original_topic)}:{part(letter.original_partition)}"
        f"@{part(letter.original_offset)}"
    )


# -------------------------------------------------------------------- options

_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _filter_options(*, stages: bool = True, limit: bool = True) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        options = []
        if stages:
            options.append(
                click.option(
                    "--stage",
                    "stages",
                    multiple=True,
                    metavar="STAGE",
                    help="Only this stage's dead letters (repeatable; default: all stages).",
                )
            )
        options += [
            click.option(
                "--reason",
                "reasons",
                multiple=True,
                metavar="REASON",
                help="Only this reason (repeatable; `dlq summary` lists them), "
                "or '?' for malformed dead letters.",
            ),
            click.option(
                "--since",
                metavar="ISO8601",
                default=None,
                help="Failed at or after this instant (needs a timezone, e.g. ...T10:00:00Z).",
            ),
            click.option(
                "--until",
                metavar="ISO8601",
                default=None,
                help="Failed before this instant (needs a timezone).",
            ),
        ]
        if limit:
            options.append(
                click.option(
                    "--limit",
                    type=click.IntRange(1),
                    default=None,
                    help="At most N dead letters (the first ones, in DLQ offset order).",
                )
            )
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


# --------------------------------------------------------------------- group


@click.group()
def dlq() -> None:
    """Inspect, export, replay and purge dead letters.

    A dead letter is named by a REF, <stage>:<dlq partition>:<dlq offset>
    (e.g. parse:0:17). Purged dead letters are hidden from every command.
    """


@dlq.command("list")
@_filter_options()
@_json_option
@click.pass_context
@handle_errors
def dlq_list(
    ctx: click.Context,
    stages: Sequence[str],
    reasons: Sequence[str],
    since: str | None,
    until: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Dead letters of the chosen stages, oldest offset first."""
    settings = settings_from(ctx)
    chosen = read.parse_stages(stages, settings.stage_ids)
    filters = read.make_filters(reasons, since, until, limit, _known(settings, chosen))
    letters = read.read_dead_letters(settings, chosen, filters)
    if as_json:
        _echo_json([view.brief(d) for d in letters])
        return
    if not letters:
        click.echo("no dead letters match")
        return
    print_table(
        ["REF", "stage", "reason", "error", "original", "failed-at", "attempts", "replays"],
        [
            [
                d.ref,
                d.stage,
                d.reason,
                _short(d.error_message),
                _original(d),
                view.iso(d.failed_at_ms),
                d.attempts,
                d.replay_count,
            ]
            for d in letters
        ],
    )
    more = " (--limit reached)" if limit is not None and len(letters) >= limit else ""
    click.echo(f"{len(letters)} dead letter(s){more}")


@dlq.command("summary")
@_filter_options(limit=False)
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Count every dead letter held, reading whole dead-letter topics (slow on long ones).",
)
@_json_option
@click.pass_context
@handle_errors
def dlq_summary(
    ctx: click.Context,
    stages: Sequence[str],
    reasons: Sequence[str],
    since: str | None,
    until: str | None,
    everything: bool,
    as_json: bool,
) -> None:
    """Dead letters counted by stage and reason, with the oldest and newest failed-at.

    Counts those that failed since --since (default: the last 24 hours), reading only
    that part of each dead-letter topic (found by bisection on time), and shows how
    many each stage holds in all; --all counts every one by reason.
    """
    settings = settings_from(ctx)
    chosen = read.parse_stages(stages, settings.stage_ids)
    filters = read.make_filters(reasons, since, until, known=_known(settings, chosen))
    window: summary.WindowSummary | None = None
    if everything:
        letters = read.iter_dead_letters(settings, chosen)
        try:
            rows = view.summarize(filters.apply(letters), settings.stage_ids)
        finally:
            letters.close()
    else:
        since_ms = filters.since_ms
        if since_ms is None:
            since_ms = int(time.time() * 1000) - summary.DEFAULT_WINDOW_MS
        window = summary.window_summary(settings, chosen, filters, since_ms, filters.until_ms)
        rows = window.rows
    if as_json:
        _echo_json(
            [
                {
                    "stage": r.stage,
                    "reason": r.reason,
                    "count": r.count,
                    "oldest_failed_at": view.iso(r.oldest_failed_at_ms),
                    "newest_failed_at": view.iso(r.newest_failed_at_ms),
                    "oldest_failed_at_ms": r.oldest_failed_at_ms,
                    "newest_failed_at_ms": r.newest_failed_at_ms,
                    "max_replay_count": r.max_replay_count,
                }
                for r in rows
            ]
        )
        return
    if window is not None:
        until_text = f" before {view.iso(window.until_ms)}" if window.until_ms else ""
        scope = f" that failed since {view.iso(window.since_ms)}{until_text}"
        held = ", ".join(f"{stage} {'?' if n is None else n}" for stage, n in window.held.items())
        footer = f"held in all: {held} (--all counts every one by reason)"
    else:
        scope, footer = "", ""
    if not rows:
        click.echo(f"no dead letters{scope} match")
        if footer:
            click.echo(footer)
        return
    print_table(
        ["stage", "reason", "count", "oldest failed-at", "newest failed-at", "max replays"],
        [
            [
                r.stage,
                r.reason,
                r.count,
                view.iso(r.oldest_failed_at_ms),
                view.iso(r.newest_failed_at_ms),
                r.max_replay_count,
            ]
            for r in rows
        ],
    )
    click.echo(f"{sum(r.count for r in rows)} dead letter(s){scope}")
    if footer:
        click.echo(footer)


@dlq.command("show")
@click.argument("ref")
@_json_option
@click.pass_context
@handle_errors
def dlq_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """One dead letter: envelope, all headers, key and a payload preview.

    REF is <stage>:<dlq partition>:<dlq offset>, as printed by `pipeline dlq list`.
    """
    settings = settings_from(ctx)
    where = read.parse_ref(ref, settings.stage_ids)
    letter = read.find(settings, where)
    key, value = view.preview(letter.key), view.preview(letter.value)
    if as_json:
        _echo_json(
            {
                **view.full(letter),
                "key_preview": _preview_json(key),
                "value_preview": _preview_json(value),
            }
        )
        return
    lines = [
        ("ref", letter.ref),
        ("stage", letter.stage),
        ("reason", letter.reason),
        ("error", f"{letter.error_class or '?'}: {clean(letter.error_message or '?')}"),
        ("original", _original(letter)),
        ("original time", view.iso(letter.original_timestamp_ms) or "?"),
        ("failed at", view.iso(letter.failed_at_ms) or "?"),
        ("attempts", cell(letter.attempts)),
        ("replay count", str(letter.replay_count)),
        ("dead letter", f"{letter.topic}[{letter.partition}]@{letter.offset}"),
        ("key", _preview_line(key)),
    ]
    if letter.problems:
        lines.append(("problems", "; ".join(letter.problems)))
    for name, text in lines:
        click.echo(f"{name + ':':<15}{text}")
    click.echo(f"headers ({len(letter.headers)}):")
    for name, raw in letter.headers:
        click.echo(f"  {clean(name)}: {_preview_line(view.preview(raw, 200))}")
    if original.is_truncated(letter):
        size = _header_text(letter, "dlq.payload.size") or "?"
        click.echo(
            f"payload truncated: {len(letter.value or b'')} of {size} bytes kept (sha256 "
            f"{_header_text(letter, 'dlq.payload.sha256')}); the whole record, while "
            f"{_original(letter)} is retained: pipeline dlq original {letter.ref} --out FILE"
        )
    if value.encoding == "none":
        click.echo("payload: (none)")
        return
    shown = f", first {view.PREVIEW_BYTES} shown" if value.truncated else ""
    click.echo(f"payload ({value.size} bytes, {value.encoding}{shown}):")
    click.echo(value.text if value.encoding == "hex" else _payload_text(value.text))


def _header_text(letter: Any, name: str) -> str | None:
    found = None
    for key, raw in letter.headers:
        if key == name and raw is not None:
            found = raw.decode("utf-8", "replace")
    return found


@dlq.command("original")
@click.argument("ref")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, writable=True),
    required=True,
    help="Write the original value (bytes as they were) to this file.",
)
@click.pass_context
@handle_errors
def dlq_original(ctx: click.Context, ref: str, out: str) -> None:
    """The whole value of the dead letter REF: its own, or for a truncated one the
    original record's, read back from its source topic and checked against its
    digest. Exits 1 with the reason if the original is gone."""
    settings = settings_from(ctx)
    letter = read.find(settings, read.parse_ref(ref, settings.stage_ids))
    value = original.original_value(settings, letter)
    with open(out, "wb") as handle:
        handle.write(value)
    source = f" from {_original(letter)}" if original.is_truncated(letter) else ""
    click.echo(f"wrote {len(value)} bytes{source} to {out}")


def _preview_json(p: view.Preview) -> dict[str, Any]:
    return {"encoding": p.encoding, "text": p.text, "size": p.size, "truncated": p.truncated}


def _preview_line(p: view.Preview) -> str:
    if p.encoding == "none":
        return "(none)"
    more = "…" if p.truncated else ""
    body = clean(p.text) if p.encoding == "text" else f"hex {p.text}"
    return f"{body}{more}"


def _payload_text(text: str) -> str:
    """Multi-line text is kept; other control characters were refused by preview()."""
    return "\n".join(clean(line) for line in text.splitlines())


@dlq.command("export")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="FILE.parquet or FILE.jsonl (written complete or not at all).",
)
@_filter_options()
@_json_option
@click.pass_context
@handle_errors
def dlq_export(
    ctx: click.Context,
    out: str,
    stages: Sequence[str],
    reasons: Sequence[str],
    since: str | None,
    until: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Write dead letters to Parquet or JSON lines (chosen by the file extension).

    Parquet keeps key, value and header values as binary; JSON lines carry bytes
    as base64 (key_b64, value_b64, …) plus a text field where they are UTF-8.
    """
    kind = export.export_format(out)
    settings = settings_from(ctx)
    chosen = read.parse_stages(stages, settings.stage_ids)
    filters = read.make_filters(reasons, since, until, limit, _known(settings, chosen))
    letters = read.iter_dead_letters(settings, chosen)
    try:
        count = export.export(filters.apply(letters), out)
    finally:
        letters.close()
    if as_json:
        _echo_json({"written": count, "path": out, "format": kind})
    else:
        click.echo(f"wrote {count} dead letter(s) to {out} ({kind})")


@dlq.command("replay")
@click.option("--stage", required=True, metavar="STAGE", help="The stage to replay into.")
@_filter_options(stages=False)
@click.option("--dry-run", is_flag=True, help="Only count what would be sent and refused.")
@click.option(
    "--rate",
    type=click.FloatRange(0.1),
    default=None,
    help="At most this many records per second (default: as fast as possible).",
)
@click.option(
    "--max-replays",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Refuse dead letters already replayed this many times.",
)
@_json_option
@click.pass_context
@handle_errors
def dlq_replay(
    ctx: click.Context,
    stage: str,
    reasons: Sequence[str],
    since: str | None,
    until: str | None,
    limit: int | None,
    dry_run: bool,
    rate: float | None,
    max_replays: int,
    as_json: bool,
) -> None:
    """Send a stage's dead letters back to its input topic.

    Each record keeps its original key, value, headers (without dlq.*) and
    timestamp, with dlq.replay-count one higher; dead letters whose replay-count
    is already --max-replays are refused. --limit picks the first N matching dead
    letters (as `dlq list` shows them), refused ones included. Returns once the
    broker acknowledged every record.

    Replayed dead letters stay in the dead-letter topic: replaying them again sends
    them again. Narrow with --since/--until, or `pipeline dlq purge` them after.
    """
    settings = settings_from(ctx)
    (chosen,) = read.parse_stages([stage], settings.stage_ids)
    filters = read.make_filters(reasons, since, until, limit, _known(settings, [chosen]))
    report = redrive.replay(
        settings, chosen, filters, max_replays=max_replays, dry_run=dry_run, rate=rate
    )
    if as_json:
        _echo_json(report.as_json())
        return
    by_reason = sorted(set(report.sent) | set(report.refused), key=_reason_order)
    if by_reason:
        sent, refused = ("would send", "would refuse") if dry_run else ("sent", "refused")
        print_table(
            ["reason", sent, refused],
            [[r, report.sent.get(r, 0), report.refused.get(r, 0)] for r in by_reason],
        )
    if dry_run:
        click.echo(
            f"dry run, nothing was sent: would send {report.sent_total} dead letter(s) of "
            f"stage {chosen} to {report.target_topic}, refuse {report.refused_total}"
        )
    else:
        click.echo(
            f"sent {report.sent_total} dead letter(s) of stage {chosen} to "
            f"{report.target_topic}; refused {report.refused_total}"
        )
    if report.refused_refs:
        shown = ", ".join(report.refused_refs[:10])
        more = f" and {len(report.refused_refs) - 10} more" if len(report.refused_refs) > 10 else ""
        click.echo(f"refused (replay-count >= {max_replays}): {shown}{more}")
    for why in list(report.skipped.values())[:10]:
        click.echo(f"not replayed: {why}")


def _known(settings: Settings, stages: Sequence[str]) -> list[str] | None:
    """The reasons ``stages`` declare (framework ones first), or None when a stage's
    code cannot be imported here (then any well-formed reason is accepted)."""
    from pipeline.errors import ConfigError
    from pipeline.registry import resolve

    declared: dict[str, None] = dict.fromkeys(FRAMEWORK)
    for stage in stages:
        try:
            definition = resolve(stage, settings.stage(stage).uses, settings.python_paths())
        except ConfigError:
            return None
        declared.update(dict.fromkeys(sorted(definition.reasons)))
    return list(declared)


def _reason_order(reason: str) -> tuple[bool, str]:
    return (reason in FRAMEWORK, reason)


@dlq.command("purge")
@click.option(
    "--stage", required=True, metavar="STAGE", help="The stage whose dead letters to purge."
)
@click.option(
    "--before",
    required=True,
    metavar="ISO8601",
    help="Purge dead letters that failed before this instant (needs a timezone).",
)
@click.option("--yes", is_flag=True, help="Really purge (without it: a dry run).")
@_json_option
@click.pass_context
@handle_errors
def dlq_purge(ctx: click.Context, stage: str, before: str, yes: bool, as_json: bool) -> None:
    """Hide a stage's dead letters that failed before --before (a dry run without --yes).

    Purging is logical: each dead-letter partition gets a floor (the committed
    offset of the consumer group <app_prefix>-dlq-floor) moved up to the first
    dead letter that failed at or after --before, scanning from the current floor;
    it never moves back. Every `pipeline dlq` command ignores what is below the
    floor. Nothing is deleted: the broker removes the records when the topic's
    retention.ms expires. A dead letter without a readable failed-at stops the
    floor.
    """
    settings = settings_from(ctx)
    (chosen,) = read.parse_stages([stage], settings.stage_ids)
    before_ms = to_ms(parse_instant(before, "--before"))
    report = purge.purge(settings, chosen, before_ms, dry_run=not yes)
    if as_json:
        _echo_json(report.as_json())
        return
    if report.by_reason:
        print_table(
            ["reason", "would purge" if report.dry_run else "purged"],
            [[r, report.by_reason[r]] for r in sorted(report.by_reason, key=_reason_order)],
        )
    for p in report.partitions:
        if p.blocked_by is not None:
            click.echo(
                f"{report.topic}[{p.partition}]: stopped at {p.blocked_by}, "
                "which has no readable dlq.failed-at"
            )
    if report.dry_run:
        click.echo(
            f"dry run, nothing was changed: {report.purged} dead letter(s) of stage {chosen} "
            f"failed before {view.iso(before_ms)}; add --yes to purge them"
        )
    else:
        click.echo(
            f"purged {report.purged} dead letter(s) of stage {chosen} (hidden below the floor; "
            f"the broker deletes them when {report.topic}'s retention.ms expires)"
        )
