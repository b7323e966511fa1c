"""``pipeline``: the command line. Human tables by default, ``--json`` for machines.

Errors go to stderr as one line saying what to do, with exit codes:
2 configuration or usage, 3 broker unreachable, 1 anything else that failed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from pipeline.cli.backfill import backfill
from pipeline.cli.common import (
    EXIT_CONFIG,
    fail,
    handle_errors,
    print_table,
    settings_from,
)
from pipeline.cli.dlq import dlq
from pipeline.cli.edge import bridge_mqtt, serve_http
from pipeline.cli.lineage import lineage_group
from pipeline.cli.replay import replay
from pipeline.cli.sink import sink
from pipeline.cli.status import status
from pipeline.cli.topology import topology
from pipeline.kafka.clients import install_log_filter


@click.group()
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="pipeline.yaml to use (default: $PIPELINE_CONFIG or ./config/pipeline.yaml).",
)
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """A streaming pipeline on Kafka: the stages config/pipeline.yaml declares
    (built in: ingest → parse → enrich → aggregate). `pipeline topology` shows them."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


@cli.command()
@click.option(
    "--port", type=int, default=None, help="Port for the embedded broker (default: free)."
)
@click.pass_context
@handle_errors
def broker(ctx: click.Context, port: int | None) -> None:
    """Run a broker in the foreground and print its bootstrap address.

    Uses KAFKA_BOOTSTRAP_SERVERS if set (only checks it answers), else Kafka in
    Docker if available, else the embedded broker. Ctrl-C stops it.
    """
    from pipeline.kafka.embedded import resolve_broker, start_embedded

    settings = settings_from(ctx)
    handle = start_embedded(port) if port else resolve_broker(settings.kafka_bootstrap_servers)
    click.echo(handle.bootstrap)
    click.echo(
        f"# {handle.kind} broker; export KAFKA_BOOTSTRAP_SERVERS={handle.bootstrap}", err=True
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()


@cli.group()
def topics() -> None:
    """Create and list the topics declared in pipeline.yaml."""


@topics.command("create")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def topics_create(ctx: click.Context, as_json: bool) -> None:
    """Create missing topics with their final partition counts (idempotent)."""
    from pipeline.kafka.clients import admin
    from pipeline.kafka.topics import create_topics

    settings = settings_from(ctx)
    statuses = create_topics(settings, admin(settings))
    _print_topics(statuses, as_json)
    mismatched = [s for s in statuses if s.action == "mismatch"]
    if mismatched:
        fail(
            f"topic {mismatched[0].name} exists with {mismatched[0].actual_partitions} partitions, "
            f"pipeline.yaml says {mismatched[0].partitions}; fix one of them",
            EXIT_CONFIG,
        )


@topics.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def topics_list(ctx: click.Context, as_json: bool) -> None:
    """Declared topics and whether they exist with the right partition count."""
    from pipeline.kafka.clients import admin
    from pipeline.kafka.topics import list_topics

    settings = settings_from(ctx)
    _print_topics(list_topics(settings, admin(settings)), as_json)


def _print_topics(statuses: list[Any], as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": s.name,
                        "partitions": s.partitions,
                        "exists": s.exists,
                        "actual_partitions": s.actual_partitions,
                        "status": s.action,
                    }
                    for s in statuses
                ],
                indent=2,
            )
        )
    else:
        print_table(
            ["topic", "partitions", "status"],
            [[s.name, s.actual_partitions or s.partitions, s.action] for s in statuses],
        )


@cli.group()
def devices() -> None:
    """The device registry (compacted topic read by the enrich stage)."""


@devices.command("load")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False))
@click.pass_context
@handle_errors
def devices_load(ctx: click.Context, csv_file: str) -> None:
    """Publish a registry CSV (device_id,site,device_type,unit[,calibration_offset,...])."""
    from pipeline.demo.registry import publish_registry, registry_topic
    from stages.enrich import read_registry_csv

    settings = settings_from(ctx)
    try:
        registry = read_registry_csv(Path(csv_file).read_text(encoding="utf-8"))
    except ValueError as exc:
        fail(f"{csv_file}: {exc}", EXIT_CONFIG)
    count = publish_registry(settings, registry)
    click.echo(f"published {count} devices to {registry_topic(settings)}")


@cli.command()
@click.argument("stage")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port.")
@click.pass_context
@handle_errors
def run(ctx: click.Context, stage: str, metrics_port: int | None) -> None:
    """Run one worker of STAGE, any stage pipeline.yaml declares (what a pod runs)."""
    from pipeline.runtime.worker import run_stage

    overrides = {"metrics_port": metrics_port} if metrics_port is not None else {}
    settings = settings_from(ctx, **overrides)
    settings.stage(stage)  # ConfigError naming the declared stages
    logging.getLogger("pipeline.rdkafka").propagate = True
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {stage} %(levelname)s %(name)s: %(message)s",
    )
    run_stage(settings, stage)


@cli.command()
@click.option(
    "--devices", "n_devices", type=click.IntRange(1, 100_000), default=20, show_default=True
)
@click.option(
    "--rate",
    type=click.FloatRange(0.1),
    default=200.0,
    show_default=True,
    help="Readings per second (all devices together).",
)
@click.option(
    "--duration",
    type=click.FloatRange(0.1),
    default=10.0,
    show_default=True,
    help="Seconds to run.",
)
@click.option("--bad-ratio", type=click.FloatRange(0.0, 1.0), default=0.01, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--via",
    type=click.Choice(["kafka", "http", "mqtt"]),
    default="kafka",
    show_default=True,
    help="kafka: produce to the ingest input; http: POST to the gateway at --url "
    "(token: $PIPELINE_GATEWAY_TOKEN); mqtt: publish QoS 1 to devices/<id>/readings at --url.",
)
@click.option("--url", default=None, help="http://host:port (gateway) or mqtt://host:port.")
@click.option("--token", envvar="PIPELINE_GATEWAY_TOKEN", default=None, hidden=True)
@click.pass_context
@handle_errors
def simulate(
    ctx: click.Context,
    n_devices: int,
    rate: float,
    duration: float,
    bad_ratio: float,
    seed: int,
    via: str,
    url: str | None,
    token: str | None,
) -> None:
    """Produce simulated readings to the ingest stage's input topic, or send them
    through the HTTP gateway or an MQTT broker (--via)."""
    from pipeline.demo.senders import HttpSender, MqttSender, Sender
    from pipeline.demo.simulator import run_simulator

    settings = settings_from(ctx)
    sender: Sender | None = None
    if via != "kafka" and not url:
        fail(f"--via {via} needs --url", EXIT_CONFIG)
    if via == "http":
        if not token:
            fail("--via http needs the gateway's token in $PIPELINE_GATEWAY_TOKEN", EXIT_CONFIG)
        sender = HttpSender(url or "", token or "")
    elif via == "mqtt":
        sender = MqttSender(url or "")
    stats = run_simulator(
        settings,
        devices=n_devices,
        rate=rate,
        duration=duration,
        bad_ratio=bad_ratio,
        seed=seed,
        sender=sender,
    )
    click.echo(json.dumps(stats))


@cli.command()
@click.option("--duration", type=click.FloatRange(1.0), default=20.0, show_default=True)
@click.option("--devices", "n_devices", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--rate", type=click.FloatRange(1.0), default=200.0, show_default=True)
@click.option("--bad-ratio", type=click.FloatRange(0.0, 1.0), default=0.01, show_default=True)
@click.option(
    "--window",
    "window_s",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="Aggregate window in seconds (the demo uses short windows to finish quickly).",
)
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), default="demo-output", show_default=True
)
@click.option(
    "--via",
    type=click.Choice(["kafka", "http", "mqtt"]),
    default="kafka",
    show_default=True,
    help="How readings get in: a Kafka producer, the HTTP gateway, or Mosquitto + the bridge.",
)
@click.pass_context
@handle_errors
def demo(
    ctx: click.Context,
    duration: float,
    n_devices: int,
    rate: float,
    bad_ratio: float,
    window_s: int,
    out_dir: str,
    via: str,
) -> None:
    """Run everything: broker, topics, registry, four stage workers, simulator, live view."""
    from pipeline.demo.run import run_demo

    settings = settings_from(ctx)
    code = run_demo(
        settings,
        config_path=ctx.obj.get("config"),
        duration=duration,
        devices=n_devices,
        rate=rate,
        bad_ratio=bad_ratio,
        window_s=window_s,
        out_dir=Path(out_dir),
        via=via,
    )
    sys.exit(code)


cli.add_command(replay)
cli.add_command(dlq)
cli.add_command(lineage_group)
cli.add_command(status)
cli.add_command(backfill)
cli.add_command(topology)
cli.add_command(sink)
cli.add_command(serve_http)
cli.add_command(bridge_mqtt)


def main() -> None:
    # librdkafka reports every failed connection attempt; commands report one line.
    rdkafka = logging.getLogger("pipeline.rdkafka")
    rdkafka.addHandler(logging.NullHandler())
    rdkafka.propagate = False
    install_log_filter()
    cli(obj={})


if __name__ == "__main__":
    main()
