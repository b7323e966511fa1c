"""The runner: binds a pure stage (``stages/``) to Kafka as a Faust agent.

One composition root, :func:`build_app`. Importing this module starts nothing.

Per partition batch the agent (1) turns records into :class:`InRecord`, (2) runs
the stage, (3) produces outputs *and* dead letters and awaits the broker's
acknowledgement of all of them, (4) writes state changes to the stage's changelog
(flushed by Faust before it commits), and only then (5) acks the batch, which
lets Faust commit its offsets. Steps 1-4 live in :mod:`pipeline.bindings`. A
crash anywhere before (5) re-delivers the batch: at-least-once, and lineage ids
make the duplicates harmless downstream.

An unexpected exception is a bug: the worker exits (code 70) without committing,
and its supervisor (Kubernetes, the demo) restarts it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import faust

from dlq import retry
from pipeline import failpoints
from pipeline.errors import StageStopped
from pipeline.kafka.clients import bootstrap, client_config, install_log_filter, wait_for_broker
from pipeline.obs import diagnostics, health, metrics
from pipeline.obs.health import HEALTH
from pipeline.obs.openlineage import StageLineage
from pipeline.records import InRecord
from pipeline.runtime.binding import (
    AggregateBinding,
    Binding,
    make_binding,
    to_in_record,
)
from pipeline.runtime.faust_fixes import apply_faust_fixes
from pipeline.runtime.transport import BatchTransport
from pipeline.settings import RunnerSettings, Settings

log = logging.getLogger("pipeline.runner")

EXIT_BUG = 70


class StageApp(faust.App):
    """A Faust app whose consumer batches the stage's input topics."""

    batch_topics: frozenset[str] = frozenset()
    #: the dead-letter budget stopped the stage: nothing more is processed or acked
    halted: bool = False
    #: how long a Fetch may wait for data (pipeline.transport.BatchConsumerThread)
    fetch_max_wait_ms: int | None = None
    #: OpenLineage run events of this worker (START, then COMPLETE or FAIL)
    run_events: StageLineage | None = None
    kafka_client_config: dict[str, Any] | None = None

    def _new_transport(self) -> Any:
        return BatchTransport(self.conf.broker_consumer, self)


def build_app(settings: Settings, stage_id: str) -> tuple[StageApp, Binding]:
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
    binding = make_binding(stage_id, settings, app)
    app.run_events = StageLineage(settings, stage_id)
    topic = app.topic(*spec.inputs, key_serializer="raw", value_serializer="raw")

    def batch_agent(on_batch: Callable[[str, int, list[InRecord]], Awaitable[None]]) -> Any:
        """An agent that hands each partition batch to ``on_batch`` and acks it after;
        a stop by the dead-letter budget parks it, anything unexpected crashes."""

        async def agent(stream: Any) -> None:
            try:
                async for event in stream.noack().events():
                    await binding.ready()  # first batch: recovery is complete by now
                    message = event.message
                    records = [to_in_record(r) for r in message.records]
                    await on_batch(message.topic, message.partition, records)
                    event.ack()
            except StageStopped:
                await _stay_stopped(app, binding)
            except asyncio.CancelledError:
                raise
            except Exception:
                _crash(app, stage_id)

        return agent

    async def live(topic: str, partition: int, records: list[InRecord]) -> None:
        await binding.handle(partition, records)

    app.agent(topic, name=f"{stage_id}-agent", concurrency=1)(batch_agent(live))

    if spec.retry is not None:
        retry_topic_name = spec.retry.topic
        app.batch_topics = app.batch_topics | {retry_topic_name}
        retry_topic = app.topic(retry_topic_name, key_serializer="raw", value_serializer="raw")

        async def when_due(topic: str, partition: int, records: list[InRecord]) -> None:
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

        async def backfill(topic: str, partition: int, records: list[InRecord]) -> None:
            await binding.handle(partition, records)

        app.agent(lane_topic, name=f"{stage_id}-backfill-agent", concurrency=1)(
            batch_agent(backfill)
        )
        app.timer(interval=0.1)(
            LaneGovernor(app, stage_id, lane_name, frozenset(spec.inputs), runner).tick
        )

    install_watchdogs(app, settings, stage_id)

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

    if isinstance(binding, AggregateBinding):
        tick_binding = binding

        async def idle_tick() -> None:
            try:
                await tick_binding.tick()
            except Exception:
                _crash(app, stage_id, "idle tick failed")

        app.timer(interval=max(0.2, settings.aggregate.idle_timeout_s / 4))(idle_tick)
    return app, binding


class LaneGovernor:
    """Live first: the backfill lane is fetched only while the live inputs have no
    more than a batch waiting on the broker.

    It pauses the lane's partitions (it never holds a lane batch back: a waiting
    agent would fill its queue, block Faust's fetch loop for live input too, and
    stop a rebalance that waits for the batch). Lane batches already fetched are
    processed, alternating with live ones at the binding's lock. After
    ``runner.backfill_max_defer_s`` paused, the lane gets half a second: under live
    overload a backfill slows down but never stops.
    """

    def __init__(
        self,
        app: StageApp,
        stage_id: str,
        lane: str,
        live_inputs: frozenset[str],
        runner: RunnerSettings,
    ) -> None:
        self.app = app
        self.stage_id = stage_id
        self.lane = lane
        self.live_inputs = live_inputs
        self.enough = runner.batch_max_records
        self.max_defer_s = runner.backfill_max_defer_s
        self.paused_since: float | None = None
        self.open_until = 0.0
        self.generation: int | None = None

    async def tick(self) -> None:
        app = self.app
        if self.generation != app.consumer_generation_id:  # a rebalance resumed everything
            self.generation, self.paused_since = app.consumer_generation_id, None
        consumer = app.consumer
        lane = [tp for tp in consumer.assignment() if tp.topic == self.lane]
        if not lane:
            return
        now = time.monotonic()
        busy = now >= self.open_until and live_backlog(app, self.live_inputs) > self.enough
        if busy and self.paused_since is None:
            consumer.pause_partitions(lane)
            self.paused_since = now
            metrics.BACKFILL_DEFERRED.labels(self.stage_id).inc()
        elif self.paused_since is not None and (
            not busy or now - self.paused_since > self.max_defer_s
        ):
            consumer.resume_partitions(lane)
            if busy:
                self.open_until = now + 0.5
            self.paused_since = None


def live_backlog(app: StageApp, topics: frozenset[str]) -> int:
    """Records of ``topics`` on the broker that this worker has not taken yet: the
    high watermark of the last Fetch minus the next offset handed to the agent."""
    consumer = app.consumer
    handed: dict[Any, int] = getattr(consumer, "_expected", {})
    total = 0
    for tp in consumer.assignment():
        if tp.topic not in topics:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:  # noqa: S112 (not fetched yet, or moving in a rebalance)
            continue
        nxt = handed.get(tp)
        if high is not None and nxt is not None:
            total += max(0, high - nxt)
    return total


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


def install_watchdogs(app: StageApp, settings: Settings, stage_id: str) -> None:
    """The event-loop heartbeat and the broker probe behind ``/healthz``, and the
    consumer-lag gauge."""
    spec = settings.stage(stage_id)
    limit = settings.runner.liveness_timeout_s
    last_tick = [time.monotonic()]

    async def heartbeat() -> None:
        last_tick[0] = time.monotonic()

    def loop_blocked() -> str | None:
        age = time.monotonic() - last_tick[0]
        if age > limit:
            return (
                f"the event loop has not run for {age:.0f}s (runner.liveness_timeout_s={limit:g})"
            )
        return None

    app.timer(interval=1.0)(heartbeat)
    HEALTH.watch("event_loop", loop_blocked)

    published: set[tuple[str, int]] = set()

    async def sample_lag() -> None:
        """Lag of each assigned input partition: the high watermark of the last Fetch
        response (right on every broker) minus the group's committed offset."""
        consumer = app.consumer
        seen: set[tuple[str, int]] = set()
        for tp in consumer.assignment():
            if tp.topic not in spec.inputs:
                continue
            try:
                high = consumer.highwater(tp)
            except Exception:  # noqa: S112 (not fetched yet, or moving in a rebalance)
                continue
            if high is None or high < 0:
                continue
            committed = consumer._committed_offset.get(tp) or 0  # type: ignore[attr-defined]
            metrics.CONSUMER_LAG.labels(stage_id, tp.topic, str(tp.partition)).set(
                max(0, high - committed)
            )
            seen.add((tp.topic, tp.partition))
        for topic, partition in published - seen:
            metrics.CONSUMER_LAG.remove(stage_id, topic, str(partition))
        published.clear()
        published.update(seen)

    app.timer(interval=settings.runner.lag_interval_s)(sample_lag)

    # The broker. Faust's clients retry a lost broker forever, so an idle worker
    # whose broker died stayed up with /healthz 200 (measured: killed broker, 2 min,
    # no sign). A metadata probe every 2 s (a thread, never the event loop) marks
    # the worker failing once the broker has not answered for liveness_timeout_s,
    # and exits it with code 3 and one line after connect_timeout_s, the bound a
    # starting worker waits; its supervisor restarts it. Nothing uncommitted is
    # lost: offsets are committed only after outputs were acknowledged.
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    exit_after = settings.runner.connect_timeout_s
    quiet = logging.getLogger("pipeline.runner.broker_probe")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False  # refused connections are reported once, below
    probe_config = {**client_config(settings), "socket.timeout.ms": 2000, "logger": quiet}
    answered: list[float] = []  # when the broker last answered; empty until the worker runs
    probe: list[AdminClient] = []

    def broker_answers() -> bool:
        if not probe:
            probe.append(AdminClient(probe_config))
        try:
            probe[0].list_topics(timeout=5.0)
        except KafkaException:
            return False
        return True

    def probe_loop() -> None:
        """In a thread of its own: a blocked event loop is reported as such (the
        event-loop watchdog), never as a missing broker."""
        while True:
            ok = broker_answers()
            now = time.monotonic()
            if ok:
                answered[0] = now
            elif now - answered[0] > exit_after:
                silent = now - answered[0]
                message = (
                    f"stage {stage_id}: no Kafka broker answered at {bootstrap(settings)} for "
                    f"{silent:.0f}s (runner.connect_timeout_s={exit_after:g}); exiting"
                )
                log.critical(message)
                if app.run_events is not None:
                    app.run_events.fail(message)
                logging.shutdown()
                os._exit(3)
            time.sleep(2.0)

    async def start_probe() -> None:
        if not answered:  # first run: the worker saw the broker when it started
            answered.append(time.monotonic())
            threading.Thread(target=probe_loop, name="broker-probe", daemon=True).start()

    def broker_unreachable() -> str | None:
        if not answered:
            return None
        silent = time.monotonic() - answered[0]
        if silent > limit:
            return (
                f"no Kafka broker has answered for {silent:.0f}s "
                f"(runner.liveness_timeout_s={limit:g})"
            )
        return None

    app.timer(interval=2.0)(start_probe)
    HEALTH.watch("broker", broker_unreachable)


def _due(records: list[InRecord], now_ms: int) -> list[InRecord]:
    """The leading records whose retry is due."""
    return list(itertools.takewhile(lambda r: retry.due_at_ms(r.headers) <= now_ms, records))


def _crash(app: StageApp, stage_id: str, what: str = "unexpected error") -> NoReturn:
    log.critical("stage %s: %s, exiting without commit", stage_id, what, exc_info=True)
    if app.run_events is not None:
        app.run_events.fail(f"stage {stage_id}: {what}")
    logging.shutdown()
    os._exit(EXIT_BUG)


def _pause_inputs(app: StageApp) -> None:
    assigned = [tp for tp in app.consumer.assignment() if tp.topic in app.batch_topics]
    app.consumer.pause_partitions(assigned)


async def _stay_stopped(app: StageApp, binding: Binding) -> None:
    """The dead-letter budget is spent: fetch nothing more, ack nothing more, and
    stay so (unhealthy) until the worker is restarted."""
    app.halted = True
    _pause_inputs(app)
    await asyncio.Event().wait()


def run_stage(settings: Settings, stage_id: str) -> None:
    """Run one stage worker in the foreground until SIGTERM/SIGINT.

    SIGQUIT logs a state dump (:mod:`pipeline.diagnostics`); SIGUSR1 makes mode log
    every thread's and task's stack.
    """
    if settings.metrics_port is not None:  # first, so probes answer while it connects
        port = health.serve(settings.metrics_host, settings.metrics_port)
        log.info(
            "stage %s: /metrics, /healthz, /readyz on http://%s:%d",
            stage_id,
            settings.metrics_host,
            port,
        )
    install_log_filter()
    failpoints.arm(settings.failpoint)
    wait_for_broker(settings, settings.runner.connect_timeout_s)
    app, binding = build_app(settings, stage_id)
    diagnostics.install(app)
    worker = faust.Worker(
        app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False
    )
    # mode's terminal spinner sets the root logger to DEBUG whenever the level is
    # above INFO: every debug record of Faust and aiokafka was then built and
    # dropped (measured: ~9 % of a worker's CPU at log_level warning)
    worker.spinner = None
    run_events = app.run_events
    assert run_events is not None
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:  # mode exits 0 after SIGTERM, 1 after an exception
        if exc.code in (0, None) and not app.halted:
            run_events.complete()
        else:
            run_events.fail(
                "stopped by its dead-letter budget"
                if app.halted
                else f"worker exited with code {exc.code}"
            )
        raise
    except BaseException as exc:
        run_events.fail(f"stage {stage_id}: {exc!r}")
        raise
    finally:
        binding.close()
