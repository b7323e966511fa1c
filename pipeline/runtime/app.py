"""The app: one stage worker as a Faust app, whichever stage pipeline.yaml declares.

One composition root, :func:`build_app`. Importing this module starts nothing.

Per partition batch an agent (1) turns records into :class:`~pipeline.records.Record`,
(2) hands them to the binding (:mod:`pipeline.runtime.binding`), which runs the
stage and waits until outputs, retries, dead letters, lineage hops and state writes
are acknowledged by the broker, and only then (3) acks the batch, which lets Faust
commit its offsets. A crash anywhere before (3) re-delivers the batch:
at-least-once, and lineage ids and the state fence make repeats harmless.

Agents: the live inputs; the retry topic (if the stage retries), re-run when due;
the backfill lane (if it has one), governed so live input goes first
(:mod:`pipeline.runtime.lanes`); a timer that advances idle partitions of a
stateful event-time stage; a timer that lets a buffering sink flush. A batch that
meets an unreachable dependency (:class:`~pipeline.errors.Unavailable`) is run
again with backoff, never acked meanwhile (:mod:`pipeline.runtime.holding`); a
sink's batch is acked once the sink made it durable. An exception that escapes the
binding is a bug the stage's ``on_error: crash`` asked for, or one in the framework:
the worker exits (code 70) without committing, and its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import faust

from dlq import retry
from pipeline.errors import ConfigError, StageStopped, Unavailable
from pipeline.kafka.clients import bootstrap, client_config
from pipeline.obs import metrics
from pipeline.obs.health import HEALTH
from pipeline.obs.openlineage import StageLineage
from pipeline.records import Record
from pipeline.runtime.binding import Batch, StageBinding, describe, to_record
from pipeline.runtime.faust_fixes import apply_faust_fixes
from pipeline.runtime.lanes import LaneGovernor
from pipeline.runtime.stage_app import StageApp
from pipeline.runtime.watchdogs import install_watchdogs
from pipeline.settings import Settings

log = logging.getLogger("pipeline.runner")

EXIT_BUG = 70
EXIT_CONFIG = 2


def build_app(settings: Settings, stage_id: str) -> tuple[StageApp, StageBinding]:
    """The Faust app of one stage worker, with its agent; starts nothing."""
    apply_faust_fixes()
    spec = settings.stage(stage_id)
    servers = bootstrap(settings).split(",")
    runner = settings.runner
    app = StageApp(
        settings.group_id(stage_id),
        broker=[f"kafka://{s.strip()}" for s in servers],
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        autodiscover=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=runner.session_timeout_s,
        broker_heartbeat_interval=max(1.0, runner.session_timeout_s / 6),
        broker_commit_interval=runner.commit_interval_s,
        broker_max_poll_records=runner.batch_max_records,
        stream_buffer_maxsize=8,
        table_standby_replicas=0,
        store="memory://",
        datadir=os.path.join(
            tempfile.gettempdir(), f"faust-{settings.group_id(stage_id)}-{os.getpid()}"
        ),
        producer_acks=-1,
        broker_credentials=faust_credentials(settings),
    )
    app.batch_topics = frozenset(spec.inputs)
    app.fetch_max_wait_ms = runner.fetch_max_wait_ms
    app.kafka_client_config = client_config(settings)
    binding = StageBinding(
        stage_id,
        settings,
        app,
        lambda what, batch: _crash(app, stage_id, what, binding, batch=batch),
    )
    app.run_events = StageLineage(settings, stage_id)
    topic = app.topic(*spec.inputs, key_serializer="raw", value_serializer="raw")

    clocks = app.landing_clocks

    def batch_agent(on_batch: Callable[[str, int, list[Record]], Awaitable[None]]) -> Any:
        """An agent that hands each partition batch to ``on_batch`` and acks it after;
        a stop by the dead-letter budget parks it, anything unexpected crashes."""

        async def agent(stream: Any) -> None:
            try:
                async for event in stream.noack().events():
                    await binding.ready()  # first batch: recovery is complete by now
                    message = event.message
                    records = [to_record(r) for r in message.records]
                    if records:
                        first = records[0]
                        clocks.batch(
                            first.topic,
                            first.partition,
                            first.offset,
                            first.timestamp_ms,
                            first.headers,
                        )
                    if await _through(binding, message, records, on_batch):
                        await binding.settle(event)
            except StageStopped:
                await _stay_stopped(app, binding)
            except asyncio.CancelledError:
                raise
            except ConfigError as exc:
                _crash(app, stage_id, f"a declaration problem: {exc}", binding, EXIT_CONFIG)
            except Exception as exc:
                _crash(app, stage_id, f"unexpected {type(exc).__name__}: {exc}", binding)

        return agent

    async def live(topic: str, partition: int, records: list[Record]) -> None:
        await binding.handle(partition, records)

    app.agent(topic, name=f"{stage_id}-agent", concurrency=1)(batch_agent(live))

    if spec.retry is not None:
        retry_topic_name = spec.retry.topic
        app.batch_topics = app.batch_topics | {retry_topic_name}
        retry_topic = app.topic(retry_topic_name, key_serializer="raw", value_serializer="raw")

        async def when_due(topic: str, partition: int, records: list[Record]) -> None:
            """Re-run records from the retry topic once they are due. While it
            waits, only the retry partition is paused: the live agent goes on."""
            tp = faust.types.TP(topic, partition)
            while records:
                now_ms = int(time.time() * 1000)
                due = _due(records, now_ms)
                if due:
                    await binding.handle(partition, due)
                    records = records[len(due) :]
                    continue
                wait_s = (retry.due_at_ms(records[0].headers) - now_ms) / 1000
                metrics.RETRY_WAIT.labels(stage_id).set(1)
                app.consumer.pause_partitions([tp])
                try:
                    await asyncio.sleep(min(wait_s, 60.0))
                finally:
                    app.consumer.resume_partitions([tp])
                    metrics.RETRY_WAIT.labels(stage_id).set(0)

        app.agent(retry_topic, name=f"{stage_id}-retry-agent", concurrency=1)(batch_agent(when_due))

    if spec.backfill_lane is not None:
        lane_name = spec.backfill_lane
        app.batch_topics = app.batch_topics | {lane_name}
        lane_topic = app.topic(lane_name, key_serializer="raw", value_serializer="raw")

        async def backfill(topic: str, partition: int, records: list[Record]) -> None:
            await binding.handle(partition, records)

        app.agent(lane_topic, name=f"{stage_id}-backfill-agent", concurrency=1)(
            batch_agent(backfill)
        )
        app.timer(interval=0.1)(
            LaneGovernor(app, stage_id, lane_name, frozenset(spec.inputs), runner).tick
        )

    install_watchdogs(app, settings, stage_id)
    app.forget_unacked = binding.forget_unacked
    if binding.flushes:

        async def flush_tick() -> None:
            try:
                await binding.flush()
            except Exception as exc:
                _crash(app, stage_id, f"sink flush failed: {type(exc).__name__}: {exc}")

        app.timer(interval=runner.sink_flush_interval_s)(flush_tick)

    async def on_rebalance_complete(sender: Any, **_: Any) -> None:
        assigned = [tp for tp in app.consumer.assignment() if tp.topic in spec.inputs]
        metrics.ASSIGNED_PARTITIONS.labels(stage_id).set(len(assigned))
        metrics.REBALANCES.labels(stage_id).inc()
        HEALTH.set_ready(True)
        if app.run_events is not None:
            app.run_events.start()  # the first call emits START, in a thread
        log.info("stage %s: %d input partitions assigned", stage_id, len(assigned))
        if binding.stopped is not None:
            _pause_inputs(app)

    app.on_rebalance_complete.connect(on_rebalance_complete)  # type: ignore[arg-type]

    if binding.ticks:

        async def idle_tick() -> None:
            try:
                await binding.tick()
            except Exception:
                _crash(app, stage_id, "idle tick failed")

        app.timer(interval=max(0.2, spec.idle_timeout_s / 4))(idle_tick)
    return app, binding


def faust_credentials(settings: Settings) -> Any:
    """The Kafka security settings for Faust's own (aiokafka) clients, from the same
    settings :func:`pipeline.kafka.client_config` gives confluent-kafka clients.
    None for PLAINTEXT."""
    protocol = settings.kafka_security_protocol.upper()
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    password = settings.kafka_sasl_password
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=password.get_secret_value() if password is not None else None,
        mechanism=settings.kafka_sasl_mechanism or "PLAIN",
        ssl_context=context,
    )


async def _through(
    binding: StageBinding,
    message: Any,
    records: list[Record],
    on_batch: Callable[[str, int, list[Record]], Awaitable[None]],
) -> bool:
    """Run one batch until it goes through; while a dependency is unreachable
    (Unavailable) run it again with backoff. False if the batch was given up
    meanwhile (a rebalance or a stop): then it is not acked, and is fetched again."""
    attempt = 0
    while True:
        try:
            await on_batch(message.topic, message.partition, records)
            return True
        except Unavailable as exc:
            attempt += 1
            wait_s = binding.dependency.failed(exc, attempt)
            if await binding.dependency.wait(message, wait_s):
                return False


def _due(records: list[Record], now_ms: int) -> list[Record]:
    """The leading records whose retry is due."""
    return list(itertools.takewhile(lambda r: retry.due_at_ms(r.headers) <= now_ms, records))


def _crash(
    app: StageApp,
    stage_id: str,
    what: str = "unexpected error",
    binding: StageBinding | None = None,
    code: int = EXIT_BUG,
    batch: Batch | None = None,
) -> NoReturn:
    """Exit without committing. The batch it failed on (``batch``, or the one being
    processed, if any) is noted in the failures topic first, so the next worker (and
    `pipeline status`) can tell a crash loop; the log line names the batch's offsets
    and the attempt."""
    line = f"stage {stage_id}: {what}"
    if batch is not None:
        line += f" on {describe(batch)}"
    if binding is not None:
        try:
            line = binding.record_failure(what, batch)
        except Exception:
            log.warning("could not note the failed batch", exc_info=True)
    log.critical("%s; exiting without commit", line, exc_info=code == EXIT_BUG)
    if app.run_events is not None:
        app.run_events.fail(line)
    logging.shutdown()
    os._exit(code)


def _pause_inputs(app: StageApp) -> None:
    assigned = [tp for tp in app.consumer.assignment() if tp.topic in app.batch_topics]
    app.consumer.pause_partitions(assigned)


async def _stay_stopped(app: StageApp, binding: StageBinding) -> None:
    """The dead-letter budget is spent: fetch nothing more, ack nothing more, and
    stay so (unhealthy) until the worker is restarted."""
    app.halted = True
    _pause_inputs(app)
    await asyncio.Event().wait()
