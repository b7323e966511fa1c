"""Worker health on a real broker: a stuck batch turns /healthz unhealthy."""

from __future__ import annotations

import json

from tests.integration.harness import Pipeline, isolated_config, wait_for
from tests.integration.test_dlq_runtime import send


def test_a_stuck_batch_turns_healthz_unhealthy(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    pipe = Pipeline(config, settings, tmp_path)
    parse = pipe.start(
        "parse",
        env={"PIPELINE_FAILPOINT": "batch-stall", "PIPELINE_RUNNER__LIVENESS_TIMEOUT_S": "3"},
    )
    try:
        wait_for(lambda: parse.get("/readyz")[0] == 200, 60, "parse ready", pipe.logs)
        assert parse.get("/healthz") == (200, b'{"status":"ok","problems":{}}')
        send(settings, settings.stages["parse"].inputs[0], [(b"k", b"{}", [])], 0)

        def failing() -> bool:
            status, body = parse.get("/healthz")
            return status == 503 and len(json.loads(body)["problems"]) == 2

        wait_for(failing, 30, "/healthz to fail on both watchdogs", pipe.logs)
        problems = json.loads(parse.get("/healthz")[1])["problems"]
        assert "one batch has been processing for" in problems["parse_batch"]
        assert "event loop has not run" in problems["event_loop"]
        assert parse.get("/readyz")[0] == 503
        assert parse.get("/debug")[0] == 404  # nothing else is served
    finally:
        parse.kill()  # blocked in the failpoint: SIGTERM would wait for the kill anyway


def test_a_worker_reports_its_streaming_run_to_openlineage(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    events_file = tmp_path / "openlineage.jsonl"
    pipe = Pipeline(config, settings, tmp_path)
    parse = pipe.start("parse", env={"PIPELINE_OPENLINEAGE__FILE_PATH": str(events_file)})
    wait_for(lambda: parse.get("/readyz")[0] == 200, 60, "parse ready", pipe.logs)
    wait_for(lambda: events_file.exists(), 10, "the START event")
    assert parse.stop() == 0
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert len({e["run"]["runId"] for e in events}) == 1
    start = events[0]
    assert start["job"]["name"] == f"{settings.app_prefix}.parse"
    assert start["job"]["facets"]["jobType"]["processingType"] == "STREAMING"
    kafka = f"kafka://{broker.bootstrap}"
    parse_spec = settings.stages["parse"]
    assert [(d["namespace"], d["name"]) for d in start["inputs"]] == [
        (kafka, parse_spec.inputs[0]),
        (kafka, parse_spec.backfill_lane),
    ]
    outputs = {(d["namespace"], d["name"]) for d in start["outputs"]}
    assert outputs == {
        (kafka, parse_spec.output),
        (kafka, settings.stages["enrich"].backfill_lane),
        (kafka, parse_spec.dlq),
    }
