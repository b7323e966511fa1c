"""R3: the aggregate's window state survives repeated SIGKILLs under load.

The aggregate is killed three times while sequenced readings flow; each new worker
recovers its windows from the changelog (``iot.aggregate.state``). Every window
emitted, before or after a restart, must equal a batch recomputation of the input,
and no window (device, metric, window_start) may be emitted twice with different
values (``assert_windows_match``); windows re-emitted identically (the killed worker
emitted them but had not committed the batch) are counted and reported.

tests/integration/test_pipeline.py covers one kill with a backlog built while the
worker is down; this one kills repeatedly while the input keeps arriving.

A kill leaves the input the worker processed since its last commit to be delivered
again. The aggregate used to recognise a re-delivered reading only by its lineage
id, and only while it remembered the window's ids (``allowed_lateness_s`` +
``closed_retention_s`` of event time, 8 + 5 s here): a longer re-delivery (a
commit interval of seconds at a few hundred readings/s, or any kill while catching
up on a backlog, where event time runs far faster than the wall clock) brought
readings whose windows were forgotten; they were dead-lettered as ``late`` although
counted, the dead-letter budget stopped the stage on its first batch, and every
restart stopped again on the same uncommitted batch.
``test_a_long_redelivery_after_a_kill_is_not_late`` reproduced it in every run; the
aggregate now keeps the next input offset its state holds (its *fence*, in the
changelog) and skips re-delivered records below it.
"""

from __future__ import annotations

import threading
import time

from tests.integration.harness import (
    REGISTRY,
    Pipeline,
    aggregates,
    assert_windows_match,
    dead_letter_summary,
    dead_letters,
    isolated_config,
    produce_steadily,
    publish_devices,
    record_figures,
    sent_records,
    wait_for,
    wait_for_all_readings,
    window_counts,
)

KILLS = 3


def _kill_aggregate_under_load(
    broker, tmp_path, env: dict[str, str], kills: int, scenario: str, kill_after_windows: int = 1
):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    for i in range(0, len(REGISTRY), 7):  # many registry changelog batches
        publish_devices(settings, REGISTRY[i : i + 7])
    pipe = Pipeline(config, settings, tmp_path)
    for stage in ("ingest", "parse", "enrich"):
        pipe.start(stage)
    pipe.start("aggregate", env=env)
    records = sent_records(6000, seed=41, devices=50, bad_ratio=0.0)
    errors: list[str] = []
    feeder = threading.Thread(
        target=produce_steadily,
        args=(settings, settings.stages["ingest"].inputs[0], records, 100, 0.25, errors),
    )
    started = time.monotonic()
    feeder.start()
    emitted_before_kill = []
    try:
        for _ in range(kills):
            victim = pipe.workers["aggregate"][-1]
            wait_for(
                lambda v=victim: (
                    v.counter("pipeline_windows_emitted_total") >= kill_after_windows
                    or (emitted_before_kill and not feeder.is_alive())
                ),
                120,
                f"the aggregate to emit {kill_after_windows} windows",
                lambda: dead_letter_summary(settings, "aggregate") + "\n" + pipe.logs(),
            )
            if victim.counter("pipeline_windows_emitted_total") < kill_after_windows:
                # a slow machine: the input ended and the workers killed before took it
                # all, so this one has nothing to emit; a kill now is not "under load"
                break
            time.sleep(1.0)
            emitted_before_kill.append(victim.counter("pipeline_windows_emitted_total"))
            victim.kill()
            pipe.start("aggregate", env=env)
        feeder.join()
        assert not errors, errors
        good = sum(r.kind == "good" for r in records)
        last = pipe.workers["aggregate"][-1]
        wait_for(  # fail fast when the restarted aggregate stops (see the docstring)
            lambda: (
                last.counter("pipeline_stage_stopped") > 0
                or sum(window_counts(aggregates(settings))[0].values()) >= good
            ),
            240,
            f"{good} readings in windows",
            pipe.logs,
        )
        assert last.counter("pipeline_stage_stopped") == 0, (
            "the restarted aggregate stopped: its dead-letter budget was spent on "
            "re-delivered readings\n" + last.log_tail(3)
        )
        got = wait_for_all_readings(pipe, good, timeout=60)
        assert_windows_match(records, got)  # includes: never twice with different values
        after_restart = sum(emitted_before_kill[1:]) + last.counter(
            "pipeline_windows_emitted_total"
        )
        assert after_restart > 0, "no window emitted after a restart"
        assert not dead_letters(settings, "aggregate"), "a reading was reported late"
        assert not dead_letters(settings, "enrich"), "a registered device was reported unknown"
        unique, again = window_counts(got)
        record_figures(
            tmp_path,
            {
                "scenario": scenario,
                "good_readings": good,
                "lost": good - sum(unique.values()),
                "windows": len(unique),
                "windows_emitted_again_identical": again,
                "windows_emitted_again_different": 0,
                "kills_under_load": len(emitted_before_kill),
                "windows_emitted_by_each_killed_worker": emitted_before_kill,
                "windows_emitted_by_restarted_workers": after_restart,
                "seconds": round(time.monotonic() - started, 1),
            },
        )
    finally:
        pipe.stop_all()


def test_window_state_survives_repeated_sigkills_under_load(broker, tmp_path):
    env: dict[str, str] = {}
    _kill_aggregate_under_load(
        broker, tmp_path, env, KILLS, f"R3 aggregate SIGKILLed {KILLS}x under load"
    )


def test_a_long_redelivery_after_a_kill_is_not_late(broker, tmp_path):
    """Default retention; commits every 30 s (Kafka Streams' default interval), and
    the kill comes once ~300 windows (~30 s of event time) were emitted, before the
    first commit: the restarted worker gets all of it again."""
    env = {"PIPELINE_RUNNER__COMMIT_INTERVAL_S": "30"}
    _kill_aggregate_under_load(
        broker,
        tmp_path,
        env,
        1,
        "R3b aggregate SIGKILLed before its first commit (30 s interval)",
        kill_after_windows=300,
    )
