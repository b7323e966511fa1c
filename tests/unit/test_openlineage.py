"""OpenLineage run events of stage workers (pipeline/openlineage.py), without a broker.

Everything goes to files under tmp_path or to 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.obs.openlineage import StageLineage, default_file_path, kafka_namespace
from pipeline.settings import Settings, load_settings

STAGE_IDS = ("ingest", "parse", "enrich", "aggregate")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "pipeline.yaml"
KAFKA = "kafka://127.0.0.1:9092"

#: what each stage reads and writes, as config/pipeline.yaml declares it
EXPECTED = {
    "ingest": (["iot.landing"], ["iot.raw", "iot.ingest.dlq"]),
    "parse": (
        ["iot.raw", "iot.backfill.raw"],
        ["iot.parsed", "iot.backfill.parsed", "iot.parse.dlq"],
    ),
    "enrich": (
        ["iot.parsed", "iot.backfill.parsed", "iot.enrich.retry", "iot.devices"],
        ["iot.enriched", "iot.backfill.enriched", "iot.enrich.dlq", "iot.enrich.retry"],
    ),
    "aggregate": (
        ["iot.enriched", "iot.backfill.enriched"],
        ["iot.aggregates", "iot.aggregate.dlq", "iot.aggregate.state"],
    ),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "PIPELINE_CONFIG", "PIPELINE_APP_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("PIPELINE_OPENLINEAGE"):
            monkeypatch.delenv(name)


def settings(**openlineage: Any) -> Settings:
    return load_settings(CONFIG, kafka_bootstrap_servers="127.0.0.1:9092", openlineage=openlineage)


def file_settings(path: Path, **more: Any) -> Settings:
    return settings(transport="file", file_path=str(path), **more)


def events(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed now: nothing listens there


def ol_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "pipeline.openlineage" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize("stage_id", STAGE_IDS)
def test_start_then_complete_are_two_streaming_run_events(tmp_path: Path, stage_id: str) -> None:
    path = tmp_path / "ol.jsonl"
    lineage = StageLineage(file_settings(path), stage_id)
    lineage.start()
    lineage.complete()

    start, complete = events(path)
    assert [start["eventType"], complete["eventType"]] == ["START", "COMPLETE"]
    assert start["run"]["runId"] == complete["run"]["runId"] == lineage.run_id
    assert uuid.UUID(lineage.run_id).version == 7
    assert start["eventTime"] <= complete["eventTime"]
    inputs, outputs = EXPECTED[stage_id]
    for event in (start, complete):
        assert event["schemaURL"].startswith("https://openlineage.io/spec/2-")
        assert event["producer"].startswith("urn:iot-pipeline:")
        job = event["job"]
        assert job["namespace"] == "iot-pipeline"
        assert job["name"] == f"iot-pipeline.{stage_id}"
        job_type = job["facets"]["jobType"]
        assert job_type["processingType"] == "STREAMING"
        assert job_type["integration"] == "FAUST"
        assert job_type["jobType"] == "JOB"
        assert "JobTypeJobFacet.json" in job_type["_schemaURL"]
        assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [
            (KAFKA, t) for t in inputs
        ]
        assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [
            (KAFKA, t) for t in outputs
        ]
        assert "errorMessage" not in event["run"].get("facets", {})
        assert event["run"]["facets"]["processing_engine"]["name"] == "Faust"


def test_fail_carries_the_error_message_and_stack_trace(tmp_path: Path) -> None:
    path = tmp_path / "ol.jsonl"
    lineage = StageLineage(file_settings(path), "parse")
    lineage.start()
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        lineage.fail("stage parse: unexpected error, exiting without commit")

    start, fail = events(path)
    assert (start["eventType"], fail["eventType"]) == ("START", "FAIL")
    assert fail["run"]["runId"] == start["run"]["runId"]
    error = fail["run"]["facets"]["errorMessage"]
    assert error["message"] == "stage parse: unexpected error, exiting without commit"
    assert error["programmingLanguage"] == "PYTHON"
    assert "RuntimeError: disk on fire" in error["stackTrace"]
    assert "ErrorMessageRunFacet.json" in error["_schemaURL"]


def test_fail_outside_an_exception_has_no_stack_trace(tmp_path: Path) -> None:
    path = tmp_path / "ol.jsonl"
    StageLineage(file_settings(path), "ingest").fail("gave up")
    (fail,) = events(path)
    assert fail["eventType"] == "FAIL"
    assert fail["run"]["facets"]["errorMessage"]["message"] == "gave up"
    assert "stackTrace" not in fail["run"]["facets"]["errorMessage"]


def test_each_event_at_most_once_and_one_terminal_event(tmp_path: Path) -> None:
    path = tmp_path / "ol.jsonl"
    lineage = StageLineage(file_settings(path), "enrich")
    lineage.start()
    lineage.start()  # e.g. called on every rebalance
    lineage.fail("crashed")
    lineage.complete()
    lineage.fail("again")
    lineage.start()
    assert [e["eventType"] for e in events(path)] == ["START", "FAIL"]


def test_each_worker_run_has_its_own_run_id_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "ol.jsonl"
    for _ in range(2):
        lineage = StageLineage(file_settings(path), "aggregate")
        lineage.start()
        lineage.complete()
    run_ids = [e["run"]["runId"] for e in events(path)]
    assert len(run_ids) == 4
    assert run_ids[0] == run_ids[1] != run_ids[2] == run_ids[3]


def test_job_namespace_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "ol.jsonl"
    StageLineage(file_settings(path, namespace="plant-7"), "parse").complete()
    (event,) = events(path)
    assert event["job"]["namespace"] == "plant-7"
    assert event["job"]["name"] == "iot-pipeline.parse"


def test_transport_none_writes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ol.jsonl"
    lineage = StageLineage(settings(transport="none", file_path=str(path)), "parse")
    lineage.start()
    lineage.complete()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
    assert ol_warnings(caplog) == []


def test_default_is_a_file_in_the_temp_dir() -> None:
    s = load_settings(CONFIG, kafka_bootstrap_servers="127.0.0.1:9092")
    assert s.openlineage.transport == "file"
    assert s.openlineage.file_path is None
    assert default_file_path(s) == str(
        Path(tempfile.gettempdir()) / "openlineage-iot-pipeline.jsonl"
    )


def test_console_transport_logs_each_event(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="openlineage.client.transport.console")
    lineage = StageLineage(settings(transport="console"), "ingest")
    lineage.start()
    lineage.complete()
    logged = [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "openlineage.client.transport.console"
    ]
    assert [e["eventType"] for e in logged] == ["START", "COMPLETE"]


def test_unwritable_file_logs_one_warning_line_per_event_and_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "ol.jsonl"  # its parent is a file: not writable, even for root
    lineage = StageLineage(file_settings(path), "parse")
    lineage.start()
    lineage.complete()
    warnings = ol_warnings(caplog)
    assert len(warnings) == 2
    assert "START event of iot-pipeline.parse not emitted (file transport)" in (
        warnings[0].getMessage()
    )
    assert "COMPLETE" in warnings[1].getMessage()
    for record in warnings:
        assert "\n" not in record.getMessage()
        assert record.exc_info is None


def test_http_to_a_closed_port_logs_a_warning_and_does_not_raise_or_hang(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    lineage = StageLineage(settings(transport="http", url=url, timeout_s=1), "enrich")
    began = time.monotonic()
    lineage.start()
    assert time.monotonic() - began < 0.5  # START is sent off the caller's thread
    lineage.fail("crashed")
    assert time.monotonic() - began < 5  # no retries
    messages = [r.getMessage() for r in ol_warnings(caplog)]
    assert len(messages) == 2
    assert all("(http transport)" in m and "\n" not in m for m in messages)
    assert "START" in messages[0]
    assert "FAIL" in messages[1]


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), json.loads(body)))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, dict[str, str], dict[str, Any]]]]]:
    received: list[tuple[str, dict[str, str], dict[str, Any]]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_http_posts_each_event_with_the_api_key(collector: Any, monkeypatch: Any) -> None:
    url, received = collector
    monkeypatch.setenv("PIPELINE_OPENLINEAGE__API_KEY", "k-123")
    s = load_settings(
        CONFIG,
        kafka_bootstrap_servers="127.0.0.1:9092",
        openlineage={"transport": "http", "url": url, "endpoint": "api/v1/lineage"},
    )
    assert s.openlineage.api_key is not None
    lineage = StageLineage(s, "aggregate")
    lineage.start()
    lineage.complete()
    assert [path for path, _, _ in received] == ["/api/v1/lineage", "/api/v1/lineage"]
    assert [body["eventType"] for _, _, body in received] == ["START", "COMPLETE"]
    assert all(headers["Authorization"] == "Bearer k-123" for _, headers, _ in received)
    assert received[0][2]["job"]["facets"]["jobType"]["processingType"] == "STREAMING"


def test_missing_bootstrap_disables_emission_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ol.jsonl"
    s = load_settings(CONFIG, openlineage={"transport": "file", "file_path": str(path)})
    assert s.kafka_bootstrap_servers is None
    lineage = StageLineage(s, "parse")
    lineage.start()
    lineage.complete()
    assert not path.exists()
    (warning,) = ol_warnings(caplog)
    assert "disabled for stage parse" in warning.getMessage()


@pytest.mark.parametrize(
    ("servers", "namespace"),
    [
        ("127.0.0.1:9092", "kafka://127.0.0.1:9092"),
        (" broker-0:9093 , broker-1:9093", "kafka://broker-0:9093"),
        ("PLAINTEXT://broker:19092", "kafka://broker:19092"),
        ("broker", "kafka://broker:9092"),
        ("[::1]:9092", "kafka://[::1]:9092"),
        ("[::1]", "kafka://[::1]:9092"),
    ],
)
def test_kafka_dataset_namespace(servers: str, namespace: str) -> None:
    assert kafka_namespace(servers) == namespace


@pytest.mark.parametrize(
    ("openlineage", "message"),
    [
        ({"transport": "kafka"}, "openlineage.transport"),
        ({"transport": "http"}, "transport 'http' needs a 'url'"),
        ({"transport": "http", "url": "marquez:5000"}, "openlineage.url"),
        ({"timeout_s": 0}, "openlineage.timeout_s"),
        ({"flie_path": "/tmp/x"}, "openlineage.flie_path"),
    ],
)
def test_settings_reject_bad_openlineage_settings(
    openlineage: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", ".")):
        load_settings(CONFIG, openlineage=openlineage)


def test_unknown_transport_from_the_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPELINE_OPENLINEAGE__TRANSPORT", "carrier-pigeon")
    with pytest.raises(ConfigError, match=r"openlineage\.transport"):
        load_settings(CONFIG)
