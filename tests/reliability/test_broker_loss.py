"""R6: the broker lost mid-run.

Each test runs its own embedded broker, so it can kill or freeze it without
touching the session's. What a worker must do when its broker goes away
(``pipeline.runner.install_watchdogs``): ``/healthz`` fails once the broker has not
answered for ``runner.liveness_timeout_s``, and the worker exits non-zero with a
one-line error after ``runner.connect_timeout_s`` — never a silent hang with
``/healthz`` 200, which is what every idle worker did before the broker probe.

The embedded broker keeps its data in memory, so a killed broker comes back empty:
"nothing lost when it returns" is tested here with a *frozen* broker (SIGSTOP,
like a network partition or a hung broker: connections open, no answers, data
kept), thawed after the workers gave up. A real Kafka restart is not reproducible
on these machines (no Docker, no Kafka download); on a real cluster the same
guarantee rests on the same rule (offsets are committed only after outputs are
acknowledged), proven by the SIGKILL scenarios of test_delivery.py.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from tests.integration.harness import (
    REGISTRY,
    Pipeline,
    StageProcess,
    assert_windows_match,
    dead_letters,
    isolated_config,
    produce_steadily,
    publish_devices,
    record_figures,
    sent_records,
    start_own_broker,
    wait_for,
    wait_for_all_readings,
    window_counts,
)
from tests.integration.test_topics_cli import run_pipeline

STAGES = ("ingest", "parse", "enrich", "aggregate")
LIVENESS_S = 8
CONNECT_S = 20
WATCHDOG_ENV = {
    "PIPELINE_RUNNER__LIVENESS_TIMEOUT_S": str(LIVENESS_S),
    "PIPELINE_RUNNER__CONNECT_TIMEOUT_S": str(CONNECT_S),
}
# generous: two loaded cores shared with other test runs
BOUND_S = CONNECT_S + 40


def _watch(workers: list[StageProcess], started: float, until: float) -> dict[str, dict[str, Any]]:
    """Poll /healthz and exit status of every worker until all exited or ``until``:
    per stage the seconds to the first 503, to the exit, and the exit code."""
    seen: dict[str, dict[str, Any]] = {
        w.stage: {"first_503_s": None, "exit_s": None, "exit_code": None} for w in workers
    }
    while time.monotonic() < until:
        for w in workers:
            row = seen[w.stage]
            if row["exit_code"] is not None:
                continue
            code = w.proc.poll() if w.proc is not None else None
            if code is not None:
                row["exit_code"], row["exit_s"] = code, round(time.monotonic() - started, 1)
            elif row["first_503_s"] is None and w.get("/healthz")[0] == 503:
                row["first_503_s"] = round(time.monotonic() - started, 1)
        if all(r["exit_code"] is not None for r in seen.values()):
            break
        time.sleep(0.5)
    return seen


def _critical_line(worker: StageProcess) -> str:
    lines = worker.log_path.read_text(errors="replace").splitlines()
    critical = [line for line in lines if "CRITICAL" in line]
    return critical[-1] if critical else ""


def _assert_reported(seen: dict[str, dict[str, Any]], workers: list[StageProcess]) -> None:
    for w in workers:
        row = seen[w.stage]
        assert row["exit_code"] not in (None, 0), (w.stage, row, w.log_tail())
        line = _critical_line(w)
        # exit 3 and one line from the broker watchdog, every stage (the aggregate's
        # idle check treats an unanswered broker as "not quiet", never as a crash)
        assert "no Kafka broker answered" in line and row["exit_code"] == 3, (
            w.stage,
            row,
            line,
        )


def _start(pipe: Pipeline) -> list[StageProcess]:
    return [pipe.start(stage, env=WATCHDOG_ENV) for stage in STAGES]


def test_a_killed_broker_makes_every_worker_fail_and_exit_and_status_exit_3(tmp_path):
    broker = start_own_broker()
    pipe: Pipeline | None = None
    try:
        config, settings = isolated_config(tmp_path, broker.bootstrap)
        publish_devices(settings, REGISTRY)
        pipe = Pipeline(config, settings, tmp_path)
        workers = _start(pipe)
        records = sent_records(2000, seed=61, bad_ratio=0.0)
        errors: list[str] = []
        stop = threading.Event()
        feeder = threading.Thread(
            target=produce_steadily,
            args=(settings, settings.stages["ingest"].inputs[0], records, 100, 0.25, errors),
            kwargs={"stop": stop.is_set},
        )
        feeder.start()
        wait_for(
            lambda: pipe.workers["aggregate"][0].counter("pipeline_records_consumed_total") > 0,
            90,
            "readings to reach the aggregate",
            pipe.logs,
        )
        stop.set()
        feeder.join()
        assert not errors, errors
        killed = time.monotonic()
        broker.kill()
        seen = _watch(workers, killed, killed + BOUND_S)
        _assert_reported(seen, workers)
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
        asked = time.monotonic()
        status = run_pipeline(["--config", str(config), "status"], env, timeout=120)
        status_s = round(time.monotonic() - asked, 1)
        assert status.returncode == 3, (status.returncode, status.stderr)
        lines = status.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        record_figures(
            tmp_path,
            {
                "scenario": "R6 broker killed mid-run",
                "liveness_timeout_s": LIVENESS_S,
                "connect_timeout_s": CONNECT_S,
                "workers": seen,
                "status_exit_code": status.returncode,
                "status_seconds": status_s,
                "status_error": lines[0],
            },
        )
    finally:
        broker.kill()
        if pipe is not None:
            for procs in pipe.workers.values():
                for p in procs:
                    p.kill()


def test_a_frozen_broker_is_reported_and_nothing_is_lost_when_it_returns(tmp_path):
    broker = start_own_broker()
    pipe: Pipeline | None = None
    try:
        config, settings = isolated_config(tmp_path, broker.bootstrap)
        publish_devices(settings, REGISTRY)
        pipe = Pipeline(config, settings, tmp_path)
        workers = _start(pipe)
        records = sent_records(4000, seed=62, devices=50, bad_ratio=0.0)
        errors: list[str] = []
        feeder = threading.Thread(
            target=produce_steadily,
            args=(settings, settings.stages["ingest"].inputs[0], records, 100, 0.25, errors),
        )
        feeder.start()
        wait_for(
            lambda: pipe.workers["aggregate"][0].counter("pipeline_records_consumed_total") > 0,
            90,
            "readings to reach the aggregate",
            pipe.logs,
        )
        frozen = time.monotonic()
        broker.freeze()  # the feeder's producer buffers meanwhile (message.timeout.ms 60 s)
        try:
            seen = _watch(workers, frozen, frozen + BOUND_S)
        finally:
            broker.thaw()
        frozen_s = round(time.monotonic() - frozen, 1)
        _assert_reported(seen, workers)
        for w in workers:  # what a supervisor does: start the exited workers again
            pipe.workers[w.stage].remove(w)
            pipe.start(w.stage, env=WATCHDOG_ENV)
        feeder.join()
        assert not errors, errors
        good = sum(r.kind == "good" for r in records)
        try:
            got = wait_for_all_readings(pipe, good, timeout=240)
        finally:
            late = dead_letters(settings, "aggregate")
            print("aggregate dead letters:", len(late), [dict(m.headers()) for m in late[:3]])
        assert_windows_match(records, got)
        assert not late, "a reading was reported late"
        unique, again = window_counts(got)
        record_figures(
            tmp_path,
            {
                "scenario": "R6 broker frozen (SIGSTOP) past connect_timeout_s, then back",
                "liveness_timeout_s": LIVENESS_S,
                "connect_timeout_s": CONNECT_S,
                "frozen_s": frozen_s,
                "workers": seen,
                "good_readings": good,
                "lost": good - sum(unique.values()),
                "windows": len(unique),
                "windows_emitted_again_identical": again,
            },
        )
    finally:
        broker.kill()
        if pipe is not None:
            for procs in pipe.workers.values():
                for p in procs:
                    p.kill()
