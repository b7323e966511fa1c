"""A worker's watchdogs behind ``/healthz``, and its consumer-lag gauge."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

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
