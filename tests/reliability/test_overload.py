"""R4: sustained overload.

Readings are offered at about three times what the pipeline sustains: the test
first offers far more than it can take, measures the aggregate's throughput
over CALIBRATION_S seconds once a backlog has built up (the pipeline's end-to-end
capacity while saturated), then offers 3x that for OVERLOAD_S more seconds.
Production is continuous (no idle gap, so no watermark advances by the idle timer
mid-stream).

Each worker's RSS (/proc/PID/status VmRSS) and the lag its ``/metrics`` reports
(``pipeline_consumer_lag_records``) are sampled every second. Asserted: RSS stays
under RSS_LIMIT_MIB and does not follow the backlog (it grows by less than
GROWTH_LIMIT_MIB between a third of the peak lag and the peak, while the backlog
triples; ingest's repeat cache is capped lower than by default, see DEDUP_MAX_KEYS);
the lag grows and drains to 0; 0 readings lost and the windows equal a
batch recomputation. The figures are printed and written to
``reliability-figures.json`` under the test's tmp dir, the samples to
``reliability-samples.json``.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from pipeline.demo.simulator import SimRecord, generate
from pipeline.kafka.clients import producer
from tests.integration.harness import (
    REGISTRY,
    Pipeline,
    assert_windows_match,
    dead_letter_summary,
    dead_letters,
    isolated_config,
    publish_devices,
    record_figures,
    rss_mib,
    wait_for,
    wait_for_all_readings,
    window_counts,
)

STAGES = ("ingest", "parse", "enrich", "aggregate")
CALIBRATION_S = 8
OVERLOAD_S = 20
#: readings generated (the feeder stops early if they run out)
READINGS = 640_000
FACTOR = 3
RSS_LIMIT_MIB = 512
# ingest remembers the readings it accepted to drop repeats: up to dedup_max_keys of
# them, about 90 bytes each (default 200000, ~17 MiB; 0.5 KB each before). A smaller
# cap here, so that the cache is full early and whatever grows after that would be
# the backlog's doing.
DEDUP_MAX_KEYS = 50_000
GROWTH_LIMIT_MIB = 64


class Feeder(threading.Thread):
    """Produces generated readings at ``rate`` per second (changeable) until stopped;
    keeps what it produced."""

    def __init__(self, settings: Any, topic: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.settings, self.topic, self.rate = settings, topic, rate
        self.sent: list[SimRecord] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        start = int(time.time() * 1000) - 7_200_000  # event time in the past hour or two
        # generated up front: generating costs more than producing, and the feeder
        # must outrun the pipeline by far on the same two cores
        self.readings = list(
            generate(50, READINGS, start_ms=start, interval_ms=200, disorder_ratio=0.05, seed=71)
        )

    def run(self) -> None:
        client = producer(self.settings)
        tick = 0.1
        try:
            next_at = time.monotonic()
            while not self.stopping.is_set() and len(self.sent) < len(self.readings):
                n = len(self.sent)
                for r in self.readings[n : n + max(1, int(self.rate * tick))]:
                    while True:
                        try:
                            client.produce(self.topic, r.value, r.key)
                            break
                        except BufferError:
                            client.poll(0.05)
                    self.sent.append(r)
                client.poll(0)
                next_at += tick
                time.sleep(max(0.0, next_at - time.monotonic()))
            if client.flush(60) != 0:
                self.errors.append("producer did not flush")
        except Exception as exc:
            self.errors.append(repr(exc))


class Sampler(threading.Thread):
    """Every second: each worker's RSS, the lag each reports, the aggregate's input."""

    def __init__(self, pipe: Pipeline) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.samples: list[dict[str, Any]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            row: dict[str, Any] = {"t": time.monotonic(), "rss": {}, "lag": {}}
            for stage in STAGES:
                w = self.pipe.workers[stage][0]
                assert w.proc is not None
                row["rss"][stage] = rss_mib(w.proc.pid)
                row["lag"][stage] = w.counter("pipeline_consumer_lag_records")
            row["aggregated"] = self.pipe.workers["aggregate"][0].counter(
                "pipeline_records_consumed_total"
            )
            self.samples.append(row)

    def throughput(self, since: float, until: float) -> float:
        """Records/s the aggregate consumed between two times (sample times)."""
        rows = [r for r in list(self.samples) if since <= r["t"] <= until]
        if len(rows) < 2:
            return 0.0
        return float(
            (rows[-1]["aggregated"] - rows[0]["aggregated"]) / (rows[-1]["t"] - rows[0]["t"])
        )


def calibrate(sampler: Sampler, pipe: Pipeline) -> float:
    """The pipeline's capacity: the aggregate's throughput over CALIBRATION_S seconds
    during which its own input always had a backlog (it was the one waiting for work
    only if the stages before it could not keep up, which is then the capacity too)."""
    saturated_at: float | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1.0)
        pipe.check_alive()
        last = sampler.samples[-1] if sampler.samples else None
        if last is None:
            continue
        if saturated_at is None and sum(last["lag"].values()) >= 5000:
            saturated_at = last["t"]
        if saturated_at is not None and last["t"] - saturated_at >= CALIBRATION_S:
            return sampler.throughput(saturated_at, last["t"])
    raise AssertionError("the pipeline never fell behind the calibration load\n" + pipe.logs())


def test_overload_keeps_memory_bounded_and_the_lag_drains(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start(
        "ingest", env={"PIPELINE_STAGES__INGEST__CONFIG__DEDUP_MAX_KEYS": str(DEDUP_MAX_KEYS)}
    )
    for stage in STAGES[1:]:
        pipe.start(stage)
    feeder = Feeder(settings, settings.stages["ingest"].inputs[0], rate=8_000)
    sampler = Sampler(pipe)
    try:
        wait_for(
            lambda: all(ps[0].get("/readyz")[0] == 200 for ps in pipe.workers.values()),
            90,
            "every worker ready",
            pipe.logs,
        )
        idle_rss = {s: rss_mib(pipe.workers[s][0].proc.pid) for s in STAGES}  # type: ignore[union-attr]
        sampler.start()
        started = time.monotonic()
        feeder.start()
        capacity = calibrate(sampler, pipe)
        feeder.rate = FACTOR * capacity
        sent_before = len(feeder.sent)
        overload_started = time.monotonic()
        feeder.join(OVERLOAD_S)
        overload_s = time.monotonic() - overload_started
        overload_rate = (len(feeder.sent) - sent_before) / overload_s
        feeder.stopping.set()
        feeder.join()
        stopped = time.monotonic()
        assert not feeder.errors, feeder.errors
        offered_rate = len(feeder.sent) / (stopped - started)
        good = len(feeder.sent)  # no poison, no repeats
        try:
            got = wait_for_all_readings(pipe, good, timeout=300)
        except AssertionError:
            print(dead_letter_summary(settings, "aggregate"))
            raise
        wait_for(
            lambda: all(not sampler.samples[-1]["lag"][s] for s in STAGES),
            60,
            "every lag gauge at 0",
            pipe.logs,
        )
        drained = time.monotonic()
        drain_capacity = sampler.throughput(stopped, drained)
        sampler.stopping.set()
        sampler.join()
        (tmp_path / "reliability-samples.json").write_text(json.dumps(sampler.samples))
        assert_windows_match(feeder.sent, got)
        assert not dead_letters(settings, "aggregate"), "a reading was reported late"
        samples = sampler.samples
        total_lag = [sum(r["lag"].values()) for r in samples]
        peak_lag = max(total_lag)
        peak_at = total_lag.index(peak_lag)
        third_at = next(i for i, lag in enumerate(total_lag) if lag >= peak_lag / 3)
        peak_rss = {s: round(max(r["rss"][s] for r in samples), 1) for s in STAGES}
        growth = {
            s: round(samples[peak_at]["rss"][s] - samples[third_at]["rss"][s], 1) for s in STAGES
        }
        unique, again = window_counts(got)
        figures = {
            "scenario": f"R4 overload {FACTOR}x capacity for {OVERLOAD_S}s",
            "overload_s": round(overload_s, 1),
            "capacity_records_per_s": round(capacity),
            "offered_records_per_s": round(offered_rate),
            "ingest_dedup_max_keys": DEDUP_MAX_KEYS,
            "overload_rate_records_per_s": round(overload_rate),
            "capacity_while_draining_records_per_s": round(drain_capacity),
            "readings_sent": good,
            "lost": good - sum(unique.values()),
            "windows": len(unique),
            "windows_emitted_again_identical": again,
            "peak_lag_records": int(peak_lag),
            "peak_lag_per_stage": {s: int(samples[peak_at]["lag"][s]) for s in STAGES},
            "drain_s_after_input_stopped": round(drained - stopped, 1),
            "idle_rss_mib": {s: round(v, 1) for s, v in idle_rss.items()},
            "peak_rss_mib": peak_rss,
            "rss_growth_mib_from_third_to_peak_lag": growth,
            "seconds": round(drained - started, 1),
        }
        record_figures(tmp_path, figures)
        assert peak_lag >= capacity * OVERLOAD_S / 2, "the input did not outrun the pipeline"
        assert total_lag[-1] == 0
        for s in STAGES:
            assert peak_rss[s] < RSS_LIMIT_MIB, (s, figures)
            assert growth[s] < GROWTH_LIMIT_MIB, (s, figures)
    finally:
        feeder.stopping.set()
        sampler.stopping.set()
        pipe.stop_all()
