"""A worker's watchdogs behind ``/healthz``, and its consumer-lag gauges."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.kafka.clients import bootstrap, client_config
from pipeline.obs import metrics
from pipeline.obs.health import HEALTH
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.runtime.stage_app import StageApp

log = logging.getLogger("pipeline.runtime")


def install_watchdogs(app: StageApp, settings: Settings, stage_id: str) -> None:
    """The event-loop heartbeat and the broker probe behind ``/healthz``, and the
    consumer-lag gauges (records and seconds)."""
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
    clocks = app.landing_clocks

    def assigned_ends() -> list[tuple[Any, int]]:
        """Each assigned input partition with the high watermark of its last Fetch
        response (right on every broker)."""
        consumer = app.consumer
        out = []
        for tp in consumer.assignment():
            if tp.topic not in spec.inputs:
                continue
            try:
                high = consumer.highwater(tp)
            except Exception:  # noqa: S112 (not fetched yet, or moving in a rebalance)
                continue
            if high is not None and high >= 0:
                out.append((tp, int(high)))
        return out

    async def observe_ends() -> None:
        """When each new end was first seen: what lag in seconds is computed from."""
        clocks.observe(
            ((tp.topic, tp.partition, high) for tp, high in assigned_ends()), time.time()
        )

    async def sample_lag() -> None:
        """Lag of each assigned input partition, in records (the end minus the group's
        committed offset) and in seconds (the age of the record at the committed
        offset, pipeline.obs.lag_time)."""
        consumer = app.consumer
        seen: set[tuple[str, int]] = set()
        now = time.time()
        for tp, high in assigned_ends():
            committed = consumer._committed_offset.get(tp) or 0  # type: ignore[attr-defined]
            labels = (stage_id, tp.topic, str(tp.partition))
            metrics.CONSUMER_LAG.labels(*labels).set(max(0, high - committed))
            age = clocks.age(tp.topic, tp.partition, committed, now) if high > committed else 0.0
            metrics.CONSUMER_LAG_SECONDS.labels(*labels).set(round(age, 3))
            seen.add((tp.topic, tp.partition))
        for topic, partition in published - seen:
            metrics.CONSUMER_LAG.remove(stage_id, topic, str(partition))
            metrics.CONSUMER_LAG_SECONDS.remove(stage_id, topic, str(partition))
        published.clear()
        published.update(seen)

    app.timer(interval=min(1.0, settings.runner.lag_interval_s))(observe_ends)
    app.timer(interval=settings.runner.lag_interval_s)(sample_lag)

    # The broker. Faust's clients retry a lost broker forever, so an idle worker
    # whose broker died stayed up with /healthz 200 (measured: killed broker, 2 min,
    # no sign). A metadata probe every 2 s (a thread, never the event loop) marks
    # the worker failing once the broker has not answered for liveness_timeout_s,
    # and exits it with code 3 and one line after connect_timeout_s, the bound a
    # starting worker waits; its supervisor restarts it. Nothing uncommitted is
    # lost: offsets are committed only after outputs were acknowledged.
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
