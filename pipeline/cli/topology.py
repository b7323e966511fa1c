"""``pipeline topology``: the graph pipeline.yaml declares, drawn and checked."""

from __future__ import annotations

import json

import click

from pipeline.cli.common import handle_errors, settings_from
from pipeline.engine.build import load_stage
from pipeline.errors import ConfigError, PipelineError


@click.command("topology")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "mermaid", "json"]),
    default="text",
    show_default=True,
    help="text for people, mermaid for docs, json for machines.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Also import every stage's code and validate its config; exit 1 on any problem.",
)
@click.pass_context
@handle_errors
def topology(ctx: click.Context, fmt: str, check: bool) -> None:
    """The stages, what each reads and writes, and the pipelines they form.

    The graph is derived from what each stage declares (inputs, outputs); checked:
    undeclared topics and cycles (refused when the config loads), inputs no stage
    writes that are not `external: true`, stateful stages whose inputs and state
    differ in partitions, and with --check each stage's code and config.
    """
    settings = settings_from(ctx)
    graph = settings.topology
    problems = graph.problems(settings.stages, settings.topics)
    if check:
        for stage_id in settings.stage_ids:
            try:
                load_stage(settings, stage_id)
            except ConfigError as exc:
                problems.append(str(exc))
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "order": list(graph.order),
                    "pipelines": [list(c) for c in graph.components()],
                    "entry_stages": list(graph.entry_stages()),
                    "final_topics": list(graph.final_topics()),
                    "stages": {
                        s: {
                            "uses": settings.stages[s].uses,
                            "inputs": list(graph.inputs[s]),
                            "outputs": list(graph.outputs[s]),
                            "feeds": list(graph.next_stages(s)),
                            "dlq": settings.stages[s].dlq,
                            "backfill_lane": settings.stages[s].backfill_lane,
                            "state_topic": settings.stages[s].state_topic,
                        }
                        for s in graph.order
                    },
                    "problems": problems,
                },
                indent=2,
            )
        )
    elif fmt == "mermaid":
        click.echo(graph.mermaid(settings.stages))
    else:
        click.echo(graph.text(settings.stages))
        for problem in problems:
            click.echo(f"problem: {problem}")
    if problems:
        raise PipelineError(f"{len(problems)} problem(s) in the topology, first: {problems[0]}")
