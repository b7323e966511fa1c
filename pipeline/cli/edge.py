"""``pipeline serve-http`` and ``pipeline bridge-mqtt``: the doors devices use
(:mod:`pipeline.edge`). Both run until SIGTERM/SIGINT; errors at start are one
line on stderr (exit 2 for settings, 3 for an unreachable broker)."""

from __future__ import annotations

import logging

import click

from pipeline.cli.common import EXIT_CONFIG, fail, handle_errors, settings_from


def _logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"
    )


@click.command("serve-http")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Bearer tokens, 'sha256:<hex> [device-id prefix]' a line "
    "(default: edge.http.tokens_file, PIPELINE_EDGE__HTTP__TOKENS_FILE).",
)
@click.pass_context
@handle_errors
def serve_http(ctx: click.Context, host: str, port: int, tokens_file: str | None) -> None:
    """HTTP gateway: POST /v1/readings (JSON, NDJSON, CSV; gzip) into the ingest
    stage's input, answered 202 once Kafka acknowledged every record."""
    from pipeline.edge.auth import TokenStore
    from pipeline.edge.http import serve_http as serve
    from pipeline.edge.writer import BrokerProbe, target_topic

    settings = settings_from(ctx)
    path = tokens_file or settings.edge.http.tokens_file
    if not path:
        fail(
            "no tokens file: pass --tokens-file F (lines 'sha256:<hex of the token> [prefix]'); "
            "authentication cannot be turned off",
            EXIT_CONFIG,
        )
        return
    tokens = TokenStore(path)
    if not tokens.grants:
        fail(f"tokens file {path} holds no token; add a 'sha256:<hex>' line", EXIT_CONFIG)
    _logging(settings.log_level, "serve-http")
    topic = target_topic(settings)
    probe = BrokerProbe(settings)
    if probe.check():
        if topic not in probe.topics:
            fail(f"topic {topic} does not exist; run `pipeline topics create`", EXIT_CONFIG)
    else:
        logging.getLogger("pipeline.edge").warning(
            "no Kafka broker answers yet; answering 503 until one does"
        )
    probe.stop()
    serve(settings, tokens, host, port)


@click.command("bridge-mqtt")
@click.option(
    "--mqtt",
    "url",
    default=None,
    help="mqtt://host:port or mqtts://host:port (default: edge.mqtt.url).",
)
@click.option(
    "--topic",
    "topics",
    multiple=True,
    help="Topic filter, repeatable, e.g. 'devices/+/readings' or "
    "'$share/bridge/devices/+/readings' (default: edge.mqtt.topics).",
)
@click.option("--client-id", default=None, help="MQTT client id (keeps the session).")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics, /healthz, /readyz.")
@click.pass_context
@handle_errors
def bridge_mqtt(
    ctx: click.Context,
    url: str | None,
    topics: tuple[str, ...],
    client_id: str | None,
    metrics_port: int | None,
) -> None:
    """MQTT bridge: subscribe with QoS 1 and acknowledge each message to the MQTT
    broker only after Kafka acknowledged it. Credentials: PIPELINE_EDGE__MQTT__USERNAME,
    PIPELINE_EDGE__MQTT__PASSWORD, PIPELINE_EDGE__MQTT__CA_FILE."""
    from pipeline.edge.mqtt import BridgeOptions, run_bridge

    overrides = {"metrics_port": metrics_port} if metrics_port is not None else {}
    settings = settings_from(ctx, **overrides)
    mqtt = settings.edge.mqtt
    options = BridgeOptions.from_settings(
        settings,
        url=url or mqtt.url,
        topics=topics or mqtt.topics,
        client_id=client_id or mqtt.client_id,
    )
    _logging(settings.log_level, "bridge-mqtt")
    raise SystemExit(run_bridge(settings, options))
