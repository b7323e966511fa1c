"""``pipeline backfill run|status|list|resume|cancel``: the orchestrated backfill.

Exit codes: 0 run COMPLETE (or nothing to do), 1 FAILED or CANCELLED (one line
on stderr says why and what to do), 2 usage or configuration, 3 broker
unreachable. ``run`` works as a one-shot container command: re-running it with
the same ``--run-id`` after the pod died resumes the run from its checkpoints.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click

from pipeline.cli.common import EXIT_CONFIG, fail, handle_errors, print_table, settings_from
from pipeline.settings import Settings

#: a run whose state was written this recently may still have a live controller
LIVE_WITHIN_S = 30.0
METRICS_HELP = "Serve /metrics and /healthz here (default: PIPELINE_METRICS_PORT, else none)."


def _default_entry(settings: Settings) -> str:
    """The first stage (in topological order) with a backfill lane, else the first."""
    with_lane = [s for s in settings.stage_ids if settings.stage(s).backfill_lane]
    return (with_lane or list(settings.stage_ids))[0]


def _serve_metrics(settings: Settings, port: int | None) -> None:
    from pipeline.obs import health

    port = settings.metrics_port if port is None else port
    if port is not None:
        bound = health.serve(settings.metrics_host, port)
        click.echo(f"backfill: /metrics on http://{settings.metrics_host}:{bound}", err=True)


@click.group("backfill")
def backfill() -> None:
    """Replay a bounded batch (Parquet files or a Kafka range) through the stages."""


def _source_from_options(
    settings: Settings,
    from_parquet: str | None,
    from_topic: str | None,
    start: str | None,
    end: str | None,
) -> Any:
    from pipeline.backfill.source import ParquetSource, TopicSource, resolve_range

    if (from_parquet is None) == (from_topic is None):
        raise click.UsageError("give exactly one of --from-parquet or --from-topic")
    if from_parquet is not None:
        if start or end:
            raise click.UsageError("--start/--end go with --from-topic")
        return ParquetSource.from_settings(settings, from_parquet)
    if not start or not end:
        raise click.UsageError("--from-topic needs --start and --end (ISO 8601 times or offsets)")
    assert from_topic is not None
    return TopicSource(settings, from_topic, resolve_range(settings, from_topic, start, end))


@backfill.command("run")
@click.option("--from-parquet", metavar="PATH|GLOB", default=None, help="Parquet file(s).")
@click.option("--from-topic", metavar="TOPIC", default=None, help="A Kafka topic of readings.")
@click.option("--start", metavar="T", default=None, help="Range start: ISO 8601 time or offset.")
@click.option("--end", metavar="T", default=None, help="Range end (exclusive): time or offset.")
@click.option(
    "--stage",
    "entry_stage",
    metavar="STAGE",
    default=None,
    help="Entry stage: its backfill lane (default: backfill.entry_stage, else the first "
    "stage with a lane).",
)
@click.option(
    "--chunk-size", type=click.IntRange(1, 1_000_000), default=None, help="Rows per chunk."
)
@click.option("--rate", type=click.FloatRange(0), default=None, help="Rows/s; 0: no limit.")
@click.option("--run-id", default=None, help="Name the run (default: bf-<time>-<random>).")
@click.option("--dry-run", is_flag=True, help="Show the chunks and row counts; send nothing.")
@click.option("--force", is_flag=True, help="Resume even if the run looks active elsewhere.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, help=METRICS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def run_cmd(
    ctx: click.Context,
    from_parquet: str | None,
    from_topic: str | None,
    start: str | None,
    end: str | None,
    entry_stage: str | None,
    chunk_size: int | None,
    rate: float | None,
    run_id: str | None,
    dry_run: bool,
    force: bool,
    metrics_port: int | None,
    as_json: bool,
) -> None:
    """Start a run (or continue the run named by --run-id), and wait until it is
    COMPLETE: every stage has committed past what it sent."""
    from pipeline.backfill.controller import (
        Controller,
        check_run_id,
        new_run,
        new_run_id,
    )
    from pipeline.backfill.state import RunStore

    settings = settings_from(ctx)
    conf = settings.backfill
    entry = entry_stage or conf.entry_stage or _default_entry(settings)
    settings.stage(entry)  # ConfigError naming the declared stages
    size = chunk_size or conf.chunk_size
    rows_per_s = conf.rate if rate is None else rate
    run_id = check_run_id(run_id) if run_id else new_run_id()
    source = _source_from_options(settings, from_parquet, from_topic, start, end)
    chunks = source.plan(size)
    if dry_run:
        _print_plan(run_id, source, chunks, entry, settings, as_json)
        return
    _serve_metrics(settings, metrics_port)
    store = RunStore(settings)
    existing = store.get(run_id)
    if existing is not None:
        if existing.fingerprint != source.fingerprint():
            fail(f"run {run_id} exists with another input; choose a new --run-id", EXIT_CONFIG)
        _resume(settings, store, existing, force, as_json, rate)
        return
    run = new_run(settings, run_id, source, chunks, entry, size, rows_per_s)
    if not chunks:
        fail("the input has no rows; nothing to backfill", 1)
    final = Controller(settings, store, run, source, chunks, _progress(as_json)).execute()
    _report(final, as_json)


@backfill.command("resume")
@click.argument("run_id")
@click.option("--rate", type=click.FloatRange(0), default=None, help="Rows/s; 0: no limit.")
@click.option("--force", is_flag=True, help="Resume even if the run looks active elsewhere.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, help=METRICS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def resume_cmd(
    ctx: click.Context,
    run_id: str,
    rate: float | None,
    force: bool,
    metrics_port: int | None,
    as_json: bool,
) -> None:
    """Continue a run from its last checkpoint (after a crash or a FAILED verdict)."""
    from pipeline.backfill.state import RunStore

    settings = settings_from(ctx)
    _serve_metrics(settings, metrics_port)
    store = RunStore(settings)
    run = store.get(run_id)
    if run is None:
        fail(f"no backfill run {run_id}; see `pipeline backfill list`", 1)
        return
    _resume(settings, store, run, force, as_json, rate)


def _resume(
    settings: Settings,
    store: Any,
    run: Any,
    force: bool,
    as_json: bool,
    rate: float | None,
) -> None:
    from pipeline.backfill.controller import Controller, open_source
    from pipeline.backfill.state import CANCELLED, COMPLETE, DRAINING, FAILED, RUNNING

    if run.state == COMPLETE:
        if not as_json:
            click.echo(f"run {run.run_id} is already COMPLETE", err=True)
        _report(run, as_json)
        return
    if run.state == CANCELLED or store.cancel_requested(run.run_id):
        fail(f"run {run.run_id} was cancelled; start a new run to send the rest", 1)
    age = time.time() - run.updated_at
    if run.state in (RUNNING, DRAINING) and age < LIVE_WITHIN_S and not force:
        fail(
            f"run {run.run_id} was updated {age:.0f}s ago: its controller may still be "
            f"running; wait {LIVE_WITHIN_S:.0f}s or pass --force",
            1,
        )
    source = open_source(settings, run.source)
    if source.fingerprint() != run.fingerprint:
        fail(f"the input of run {run.run_id} changed since it started; start a new run", 1)
    chunks = source.plan(run.chunk_size)
    if run.state == FAILED:
        run.state = RUNNING if run.chunks_done < run.total_chunks else DRAINING
        run.reason = None
    run.attempts += 1
    if rate is not None:
        run.rate = rate
    final = Controller(settings, store, run, source, chunks, _progress(as_json)).execute()
    _report(final, as_json)


@backfill.command("status")
@click.argument("run_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def status_cmd(ctx: click.Context, run_id: str | None, as_json: bool) -> None:
    """One run in detail (default: the newest)."""
    from pipeline.backfill.state import RunStore

    runs = RunStore(settings_from(ctx)).runs()
    if run_id is not None:
        runs = [r for r in runs if r.run_id == run_id]
    if not runs:
        fail(
            f"no backfill run {run_id}" if run_id else "no backfill runs yet",
            1,
        )
        return
    run = runs[0]
    if as_json:
        click.echo(json.dumps(run.as_json(), indent=2))
        return
    print_table(["field", "value"], _status_rows(run))


@backfill.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every run, newest first."""
    from pipeline.backfill.state import RunStore

    runs = RunStore(settings_from(ctx)).runs()
    if as_json:
        click.echo(json.dumps([r.as_json() for r in runs], indent=2))
        return
    print_table(
        ["run", "state", "chunks", "rows sent", "input", "created"],
        [
            [
                r.run_id,
                r.state,
                f"{r.chunks_done}/{r.total_chunks}",
                r.rows_sent,
                _input(r.source),
                _when(r.created_at),
            ]
            for r in runs
        ],
    )


@backfill.command("cancel")
@click.argument("run_id")
@click.pass_context
@handle_errors
def cancel_cmd(ctx: click.Context, run_id: str) -> None:
    """Stop a run: its controller sends no further chunk; the state says CANCELLED,
    with what was sent."""
    from pipeline.backfill.state import CANCELLED, TERMINAL, RunStore

    store = RunStore(settings_from(ctx))
    run = store.get(run_id)
    if run is None:
        fail(f"no backfill run {run_id}; see `pipeline backfill list`", 1)
        return
    if run.state in TERMINAL:
        fail(f"run {run_id} is already {run.state}; nothing to cancel", 1)
    store.request_cancel(run_id)
    if time.time() - run.updated_at > LIVE_WITHIN_S:  # no controller is writing it
        run.state, run.reason, run.finished_at = CANCELLED, "cancel requested", time.time()
        store.save(run)
    click.echo(
        f"run {run_id}: cancel requested after {run.chunks_done}/{run.total_chunks} chunks "
        f"({run.rows_sent} rows sent); a running controller stops before its next chunk"
    )


# ------------------------------------------------------------------------ output


def _print_plan(
    run_id: str, source: Any, chunks: list[Any], entry: str, settings: Settings, as_json: bool
) -> None:
    from pipeline.backfill.controller import entry_topic

    total = sum(c.rows for c in chunks)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "run_id": run_id,
                    "dry_run": True,
                    "source": source.describe(),
                    "entry_stage": entry,
                    "entry_topic": entry_topic(settings, entry),
                    "total_rows": total,
                    "chunks": [c.as_json() for c in chunks],
                },
                indent=2,
            )
        )
        return
    shown = chunks if len(chunks) <= 25 else [*chunks[:20], None, *chunks[-4:]]
    print_table(
        ["chunk", "part", "unit", "from", "rows"],
        [
            ["…", "", "", "", ""] if c is None else [c.index, c.part, c.unit, c.start, c.rows]
            for c in shown
        ],
    )
    click.echo(
        f"dry run {run_id}: {len(chunks)} chunks, {total} rows → "
        f"{entry_topic(settings, entry)} (stage {entry}); nothing sent"
    )


def _report(run: Any, as_json: bool) -> None:
    from pipeline.backfill.state import COMPLETE

    if as_json:
        click.echo(json.dumps(run.as_json(), indent=2))
    else:
        print_table(["field", "value"], _status_rows(run))
    if run.state != COMPLETE:
        fail(
            f"run {run.run_id} {run.state}: {run.reason or 'not complete'}; "
            f"`pipeline backfill status {run.run_id}` for details",
            1,
        )


def _status_rows(run: Any) -> list[list[Any]]:
    rows: list[list[Any]] = [
        ["run", run.run_id],
        ["state", run.state],
        ["input", _input(run.source)],
        ["entry", f"{run.entry_stage} ({run.entry_topic})"],
        ["chunks", f"{run.chunks_done}/{run.total_chunks} (size {run.chunk_size})"],
        ["rows sent", f"{run.rows_sent} of {run.total_rows}"],
        ["rows dead-lettered at ingest", run.rows_dead_lettered],
        ["rows repeated in input", run.rows_duplicate],
        ["rate limit", f"{run.rate:g} rows/s" if run.rate else "none"],
        ["created", _when(run.created_at)],
        ["updated", _when(run.updated_at)],
    ]
    if run.waiting_for:
        rows.append(["waiting for", run.waiting_for])
    if run.finished_at:
        rows.append(["finished", _when(run.finished_at)])
    if run.dead_letters:
        rows.append(
            [
                "dead letters",
                "; ".join(
                    f"{stage}: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
                    for stage, reasons in run.dead_letters.items()
                ),
            ]
        )
    if run.reason:
        rows.append(["reason", run.reason])
    if run.attempts > 1:
        rows.append(["attempts", run.attempts])
    return rows


def _input(source: dict[str, Any]) -> str:
    if source.get("kind") == "parquet":
        files = source.get("files", [])
        return f"{source.get('pattern')} ({len(files)} file{'s' if len(files) != 1 else ''})"
    ranges = source.get("ranges", [])
    return f"{source.get('topic')} ({sum(max(0, e - s) for _, s, e in ranges)} records)"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _progress(as_json: bool) -> Any:
    from pipeline.backfill.controller import Progress

    class Bar(Progress):
        """A progress bar on a terminal; a line every 10 s otherwise (logs, Jobs)."""

        def __init__(self) -> None:
            self._bar: Any = None
            self._task: Any = None
            self._last_line = 0.0
            self._t0 = time.monotonic()
            self._rows0 = 0

        def started(self, run: Any) -> None:
            self._rows0 = run.rows_sent
            if sys.stderr.isatty() and not as_json:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeRemainingColumn,
                )
                from rich.progress import (
                    Progress as RichProgress,
                )

                self._bar = RichProgress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("rows · {task.fields[rate]} rows/s · {task.fields[chunks]}"),
                    TimeRemainingColumn(),
                    console=Console(stderr=True),
                )
                self._task = self._bar.add_task(
                    f"backfill {run.run_id}",
                    total=run.total_rows,
                    completed=run.rows_sent,
                    rate="-",
                    chunks=f"chunk {run.chunks_done}/{run.total_chunks}",
                )
                self._bar.start()
            else:
                click.echo(
                    f"backfill {run.run_id}: {run.total_chunks - run.chunks_done} of "
                    f"{run.total_chunks} chunks to send → {run.entry_topic}",
                    err=True,
                )

        def chunk(self, run: Any, rows: int) -> None:
            elapsed = max(1e-6, time.monotonic() - self._t0)
            rate = (run.rows_sent - self._rows0) / elapsed
            if self._bar is not None:
                self._bar.update(
                    self._task,
                    completed=run.rows_sent + run.rows_dead_lettered + run.rows_duplicate,
                    rate=f"{rate:,.0f}",
                    chunks=f"chunk {run.chunks_done}/{run.total_chunks}",
                )
            elif time.monotonic() - self._last_line > 10 or run.chunks_done == run.total_chunks:
                self._last_line = time.monotonic()
                click.echo(
                    f"backfill {run.run_id}: chunk {run.chunks_done}/{run.total_chunks}, "
                    f"{run.rows_sent} rows sent, {rate:,.0f} rows/s",
                    err=True,
                )

        def waiting(self, run: Any, stage: str, left: int) -> None:
            if self._bar is not None:
                self._bar.update(self._task, description=f"waiting for {stage} ({left} left)")
            elif time.monotonic() - self._last_line > 10:
                self._last_line = time.monotonic()
                click.echo(
                    f"backfill {run.run_id}: all sent; waiting for {stage} ({left} records)",
                    err=True,
                )

        def finished(self, run: Any) -> None:
            if self._bar is not None:
                self._bar.stop()

    return Bar()
