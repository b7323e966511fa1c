"""A stateless stage leaves a batch in flight (its outputs' acknowledgement and its
lineage hops with ``runner.batches_in_flight`` above 1, its hops alone with
``runner.overlap_lineage``) while the next runs. On the real broker: a batch whose
landing fails is never committed, though its outputs were written; the worker exits
70, and after a restart the batch is processed again, nothing lost. The batch that
failed to land is noted in the failures topic like one a worker crashed on, so a
worker that keeps failing there shows as crash-looping; while it waits,
``pipeline_batches_in_flight`` counts it.

The ``landing-fail`` failpoint waits (without blocking the worker) for several commit
intervals after the batch's outputs were acknowledged and then fails the landing, as
a broker that refuses the hops would: an early ack would be committed meanwhile.
"""

from __future__ import annotations

import time

import orjson
import pytest

from pipeline import contract
from pipeline.kafka.clients import admin
from pipeline.kafka.offsets import committed_offsets, read_topic
from pipeline.obs.failures import read_failures
from tests.integration.harness import (
    REGISTRY,
    Pipeline,
    assert_windows_match,
    isolated_config,
    produce,
    publish_devices,
    sent_records,
    wait_for,
    wait_for_all_readings,
)
from tests.integration.test_dlq_runtime import header, send

DELAY_S = 4.0  # eight commit intervals of the tests (0.5 s)


def readings(count: int) -> list[tuple[bytes, bytes, list]]:
    now = int(time.time() * 1000)
    out = []
    for i in range(count):
        body = {"device_id": "dev-0001", "ts": now - 60_000 + i, "seq": i, "metric": "power"}
        body |= {"value": 5.0, "unit": "W"}
        out.append((b"dev-0001", orjson.dumps(body), [(contract.H_LINEAGE, b"L%d" % i)]))
    return out


@pytest.mark.parametrize(
    "in_flight", ["4", "1"], ids=["outputs-and-hops-in-flight", "hops-in-flight"]
)
def test_a_batch_whose_landing_fails_is_not_committed_and_runs_again(broker, tmp_path, in_flight):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    raw = settings.stages["parse"].inputs[0]
    out = settings.stages["parse"].output
    group = settings.group_id("parse")
    env = {"PIPELINE_RUNNER__BATCHES_IN_FLIGHT": in_flight}
    pipe = Pipeline(config, settings, tmp_path)
    first = pipe.start("parse", env={**env, "PIPELINE_FAILPOINT": f"landing-fail:1@{DELAY_S}"})
    try:
        assert send(settings, raw, readings(20), partition=0) == list(range(20))
        wait_for(lambda: read_topic(settings, out), 60, "parse's first outputs", pipe.logs)
        written_at = time.monotonic()
        # the first batch's outputs are on the topic; its landing fails DELAY_S later:
        # meanwhile nothing of the partition may be committed
        seen_commits, landing = [], []
        while first.alive() and time.monotonic() - written_at < DELAY_S - 1:
            seen_commits.append(committed_offsets(admin(settings), group, [(raw, 0)])[(raw, 0)])
            if time.monotonic() - written_at < DELAY_S / 2:  # well before it fails
                gauge = ("pipeline_batches_in_flight", (("stage", "parse"),))
                landing.append(first.metrics()[gauge])
            time.sleep(0.3)
        assert seen_commits and set(seen_commits) == {None}, seen_commits
        assert landing and min(landing) >= 1.0, landing  # the failing batch, waiting
        wait_for(lambda: not first.alive(), 60, "the failed landing to stop parse", pipe.logs)
        assert first.proc is not None and first.proc.returncode == 70, first.proc.returncode
        log = first.log_path.read_text()
        assert "failpoint landing-fail" in log and "exiting without commit" in log
        assert f"{raw}[0] offsets 0-" in log and "(attempt 1 on this batch)" in log
        assert committed_offsets(admin(settings), group, [(raw, 0)])[(raw, 0)] is None
        (failure,) = read_failures(settings, "parse")
        assert (failure.topic, failure.partition, failure.offset) == (raw, 0, 0), failure
        assert failure.attempts == 1 and "failpoint landing-fail" in failure.error, failure

        # the same batch fails to land again: a crash loop, on record
        again = pipe.start("parse", env={**env, "PIPELINE_FAILPOINT": "landing-fail:1@0.5"})
        wait_for(lambda: not again.alive(), 60, "the second failed landing", pipe.logs)
        assert again.proc is not None and again.proc.returncode == 70
        assert "(attempt 2 on this batch)" in again.log_path.read_text()
        (failure,) = read_failures(settings, "parse")
        assert failure.offset == 0 and failure.looping, failure
        before = len(read_topic(settings, out))

        pipe.start("parse", env=env)
        wait_for(
            lambda: committed_offsets(admin(settings), group, [(raw, 0)])[(raw, 0)] == 20,
            60,
            "every reading committed after the restart",
            pipe.logs,
        )
        outputs = read_topic(settings, out)
        lineage = [header(m, contract.H_LINEAGE) for m in outputs]
        assert set(lineage) == {b"L%d" % i for i in range(20)}  # nothing lost
        # the failed batch was written before the failure and again after the restart
        assert len(outputs) == before + 20 and before >= 1
        # it landed this time: the record of the failure is cleared
        wait_for(
            lambda: read_failures(settings, "parse") == [], 30, "the failure cleared", pipe.logs
        )
    finally:
        pipe.stop_all()


def test_a_stateful_batch_whose_state_writes_fail_to_land_is_not_committed(broker, tmp_path):
    """The aggregate (stateful): its outputs are acknowledged before its state writes
    are sent, which then stay in flight while the next batch runs. The first batch's
    state writes fail to land: nothing of its input is committed meanwhile, the worker
    exits 70, and after a restart every good reading is counted once."""
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    source = settings.stages["aggregate"].inputs[0]
    tps = [(source, p) for p in range(settings.topics[source].partitions)]
    group = settings.group_id("aggregate")
    pipe = Pipeline(config, settings, tmp_path)
    for stage in ("ingest", "parse", "enrich"):
        pipe.start(stage)
    first = pipe.start("aggregate", env={"PIPELINE_FAILPOINT": f"landing-fail:1@{DELAY_S}"})
    try:
        records = sent_records(600, seed=21, bad_ratio=0.0)
        produce(settings, settings.stages["ingest"].inputs[0], records)
        wait_for(
            lambda: "failpoint landing-fail" in first.log_path.read_text(),
            90,
            "the aggregate's first batch to reach the failpoint",
            pipe.logs,
        )
        commits = []
        deadline = time.monotonic() + DELAY_S + 30
        while first.alive() and time.monotonic() < deadline:
            commits.append(committed_offsets(admin(settings), group, tps))
            time.sleep(0.3)
        assert first.proc is not None and first.proc.poll() == 70, first.proc.poll()
        # while the failing landing was pending (DELAY_S) the partition of the failed
        # batch got no commit at all, though batches of it after were processed
        with_data = {(m.topic(), m.partition()) for m in read_topic(settings, source)}
        never = [tp for tp in with_data if all(c[tp] is None for c in commits)]
        assert len(commits) >= int(DELAY_S / 0.3) - 3 and never, commits[-1:]
        assert "failpoint landing-fail" in first.log_path.read_text()

        pipe.workers["aggregate"].remove(first)  # its exit was the point
        pipe.start("aggregate")
        got = wait_for_all_readings(pipe, sum(r.kind == "good" for r in records))
        assert_windows_match(records, got)
    finally:
        pipe.stop_all()
