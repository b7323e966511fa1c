"""The HTTP gateway on the real broker: `pipeline serve-http` as a process, a real
ingest worker behind it. A 202 means the records are in Kafka; everything refused
at the door leaves nothing behind."""

from __future__ import annotations

import gzip
import socket
import time
from pathlib import Path

import orjson
import pytest

from pipeline.edge.writer import target_topic
from pipeline.kafka.embedded import BrokerHandle
from pipeline.kafka.offsets import read_topic
from tests.integration.edge import (
    TOKEN_ALL,
    TOKEN_FLEET_A,
    gateway,
    identities,
    landed,
    post,
    reading,
)
from tests.integration.harness import (
    Pipeline,
    isolated_config,
    start_own_broker,
    wait_for,
)


def test_every_accepted_reading_is_in_kafka_at_the_202_and_reaches_iot_raw(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    door = gateway(config, broker.bootstrap, tmp_path)
    landing = target_topic(settings)
    assert landing == settings.stages["ingest"].inputs[0]
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start("ingest")
    try:
        requests: list[tuple[bytes, str, dict[str, str]]] = [
            (orjson.dumps(reading("fleet-a-1", 0)), "application/json", {}),
            (orjson.dumps([reading("fleet-a-1", i) for i in range(1, 51)]), "application/json", {}),
            (
                b"\n".join(orjson.dumps(reading("fleet-b-2", i)) for i in range(50)) + b"\n",
                "application/x-ndjson",
                {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"},
            ),
            (
                gzip.compress(
                    b"device_id,ts,seq,metric,value,unit\n"
                    + b"".join(
                        f"fleet-c-3,{int(time.time() * 1000)},{i},temperature,20.5,C\n".encode()
                        for i in range(100)
                    )
                ),
                "text/csv; charset=utf-8",
                {"Content-Encoding": "gzip"},
            ),
        ]
        accepted = 0
        for body, content_type, headers in requests:
            status, answer, _ = post(door.port, body, content_type, headers=headers)
            assert status == 202, answer
            accepted += int(answer["accepted"])  # type: ignore[arg-type]
            # the 202 came after the broker's acknowledgement: the records are there now
            assert len(read_topic(settings, landing)) == accepted
        assert accepted == 1 + 50 + 50 + 100

        records = landed(settings, landing)
        assert {key for key, _ in records} == {b"fleet-a-1", b"fleet-b-2", b"fleet-c-3"}
        traced = [
            m
            for m in read_topic(settings, landing)
            if dict(m.headers() or []).get("traceparent", b"").startswith(b"00-" + b"ab" * 16)
        ]
        assert len(traced) == 50  # the client's trace context rides on its records

        raw_topic = settings.stages["ingest"].output
        assert raw_topic is not None
        raw: list = []

        def through() -> bool:
            pipe.check_alive()
            raw[:] = read_topic(settings, raw_topic)
            return len(raw) >= accepted

        wait_for(through, 90, f"{accepted} records in {raw_topic}", pipe.logs)
        assert len(raw) == accepted
        lineage = {dict(m.headers() or [])["lineage-id"] for m in raw}
        assert len(lineage) == accepted
        assert door.metric("pipeline_edge_records_total", door="http") == accepted
        assert door.metric("pipeline_edge_requests_total", status="202") == len(requests)
    finally:
        pipe.stop_all()
        assert door.stop() == 0, door.log()


def test_bad_input_at_the_door_gets_a_clear_status_and_writes_nothing(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    door = gateway(
        config, broker.bootstrap, tmp_path, env={"PIPELINE_EDGE__HTTP__READ_TIMEOUT_S": "2"}
    )
    landing = target_topic(settings)
    secret_marker = "s3cr3t-payload-marker"
    good = orjson.dumps(reading("fleet-a-1", 1) | {"note": secret_marker})
    cases: list[tuple[str, bytes, str, str | None, dict[str, str], int, str]] = [
        ("empty body", b"", "application/json", TOKEN_ALL, {}, 400, "no record"),
        ("empty csv", b"\n", "text/csv", TOKEN_ALL, {}, 400, "no record"),
        (
            "gzip bomb (50 MB of zeros)",
            gzip.compress(b"\0" * 50_000_000),
            "application/x-ndjson",
            TOKEN_ALL,
            {"Content-Encoding": "gzip"},
            413,
            "decompressed",
        ),
        (
            "invalid UTF-8",
            b'{"device_id": "\xff\xfe"}',
            "application/json",
            TOKEN_ALL,
            {},
            400,
            "UTF-8",
        ),
        ("10 MB body", b"x" * 10_000_000, "application/json", TOKEN_ALL, {}, 413, "over"),
        (
            "a million tiny records",
            b"{}\n" * 1_000_000,
            "application/x-ndjson",
            TOKEN_ALL,
            {},
            413,
            "over",
        ),
        (
            "a million tiny records, gzipped under the size limits",
            gzip.compress(b"1\n" * 1_000_000),
            "application/x-ndjson",
            TOKEN_ALL,
            {"Content-Encoding": "gzip"},
            413,
            "more than 10000 records",
        ),
        ("no token", good, "application/json", None, {}, 401, "bearer token"),
        ("wrong token", good, "application/json", "not-a-token", {}, 401, "bearer token"),
        (
            "token for another fleet",
            orjson.dumps([reading("fleet-a-1", 2), reading("fleet-b-1", 3)]),
            "application/json",
            TOKEN_FLEET_A,
            {},
            403,
            "record 1",
        ),
        ("unsupported type", good, "text/plain", TOKEN_ALL, {}, 415, "Content-Type"),
        ("JSON scalar", b"42", "application/json", TOKEN_ALL, {}, 400, "object or an array"),
    ]
    try:
        for name, body, content_type, token, headers, want, words in cases:
            status, answer, sent_headers = post(door.port, body, content_type, token, headers)
            assert status == want, (name, status, answer)
            assert words in str(answer.get("error")), (name, answer)
            if status == 401:
                assert sent_headers.get("www-authenticate", "").startswith("Bearer")
        # a slow client: headers, then part of the body, then nothing
        with socket.create_connection(("127.0.0.1", door.port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/readings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {TOKEN_ALL}\r\nContent-Length: 100\r\n\r\n".encode()
                + b'{"device_id"'
            )
            answer_bytes = sock.recv(4096)
        assert answer_bytes.startswith(b"HTTP/1.1 408"), answer_bytes
        # nothing refused was written, not even part of a request
        assert read_topic(settings, landing) == []
        # the token for fleet A still works for fleet A
        status, answer, _ = post(door.port, good, token=TOKEN_FLEET_A)
        assert (status, answer) == (202, {"accepted": 1})
        assert len(read_topic(settings, landing)) == 1
        rejected = door.metric("pipeline_edge_rejected_total", door="http")
        assert rejected == len(cases) + 1
    finally:
        assert door.stop() == 0
    log = door.log()
    for secret in (TOKEN_ALL, TOKEN_FLEET_A, "not-a-token", secret_marker, "fleet-b-1"):
        assert secret not in log


def test_openapi_health_and_metrics_are_served(broker: BrokerHandle, tmp_path: Path) -> None:
    config, _ = isolated_config(tmp_path, broker.bootstrap)
    door = gateway(config, broker.bootstrap, tmp_path)
    try:
        status, body = door.get("/openapi.json")
        doc = orjson.loads(body)
        assert status == 200
        assert doc["openapi"].startswith("3.")
        post_op = doc["paths"]["/v1/readings"]["post"]
        assert {"202", "400", "401", "403", "413", "429", "503"} <= set(post_op["responses"])
        assert door.get("/healthz") == (200, b'{"status":"ok","problems":{}}')
        assert door.get("/readyz")[0] == 200
        assert door.get("/metrics")[0] == 200
        assert door.get("/")[0] == 404
        assert door.get("/v1/readings")[0] == 405
    finally:
        door.stop()


def test_a_full_queue_answers_429_and_writes_nothing(broker: BrokerHandle, tmp_path: Path) -> None:
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    door = gateway(
        config,
        broker.bootstrap,
        tmp_path,
        env={"PIPELINE_EDGE__HTTP__MAX_IN_FLIGHT_RECORDS": "10"},
    )
    try:
        body = orjson.dumps([reading("d-1", i) for i in range(11)])
        status, answer, headers = post(door.port, body)
        assert status == 429, answer
        assert headers["retry-after"] == "1"
        assert read_topic(settings, target_topic(settings)) == []
        status, answer, _ = post(door.port, orjson.dumps([reading("d-1", i) for i in range(10)]))
        assert (status, answer) == (202, {"accepted": 10})
    finally:
        door.stop()


@pytest.mark.timeout(180)
def test_an_unreachable_broker_answers_503_and_nothing_accepted_is_lost(tmp_path: Path) -> None:
    own = start_own_broker()
    try:
        config, settings = isolated_config(tmp_path, own.bootstrap)
        door = gateway(
            config,
            own.bootstrap,
            tmp_path,
            env={"PIPELINE_EDGE__HTTP__ACK_TIMEOUT_S": "3"},
        )
        accepted: list[bytes] = []
        seq = 0

        def send() -> tuple[int, dict[str, str]]:
            nonlocal seq
            values = [orjson.dumps(reading("d-7", seq + i)) for i in range(5)]
            seq += 5
            status, _, headers = post(door.port, b"\n".join(values), "application/x-ndjson")
            if status == 202:
                accepted.extend(values)
            return status, headers

        assert send()[0] == 202
        own.freeze()
        outcome: list[tuple[int, dict[str, str]]] = []

        def unavailable() -> bool:
            outcome.append(send())
            return outcome[-1][0] == 503

        wait_for(unavailable, 60, "a 503 from the gateway", door.log)
        assert outcome[-1][1]["retry-after"] == "5"
        assert {s for s, _ in outcome} <= {202, 503}
        own.thaw()
        wait_for(lambda: send()[0] == 202, 60, "a 202 after the broker is back", door.log)
        got = identities(v for _, v in landed(settings, target_topic(settings)))
        assert set(identities(accepted)) <= set(got)  # every 202 is there
        door.stop()
    finally:
        own.kill()
