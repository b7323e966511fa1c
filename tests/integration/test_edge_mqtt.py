"""The MQTT bridge against a real Mosquitto and the real broker: a PUBACK only
after Kafka acknowledged, so a SIGKILLed bridge loses nothing (QoS 1 redelivery to
the same session), duplicates keep their lineage id downstream, a Mosquitto
restart is survived, shared subscriptions split the load."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import orjson
import pytest

from pipeline.edge.mosquitto import start_mosquitto
from pipeline.edge.writer import target_topic
from pipeline.kafka.embedded import BrokerHandle
from pipeline.kafka.offsets import read_topic
from pipeline.settings import Settings
from tests.integration.edge import (
    Publisher,
    bridge,
    identities,
    landed,
    publish_in_thread,
    reading,
)
from tests.integration.harness import Pipeline, isolated_config, wait_for


def _messages(n: int, devices: int = 10, start: int = 0) -> list[tuple[str, bytes]]:
    """Readings without a device id: the bridge takes it from the topic."""
    out = []
    for i in range(start, start + n):
        doc = reading(f"dev-{i % devices:03d}", i)
        del doc["device_id"]
        out.append((f"devices/dev-{i % devices:03d}/readings", orjson.dumps(doc)))
    return out


def _wait_landed(settings: Settings, want: set[tuple[str, int]], what: str, logs) -> list:
    got: list = []

    def done() -> bool:
        got[:] = identities(v for _, v in landed(settings, target_topic(settings)))
        return want <= set(got)

    wait_for(done, 120, what, logs)
    return got


@pytest.mark.timeout(240)
def test_a_sigkilled_bridge_loses_nothing_and_duplicates_keep_their_lineage_id(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    landing = target_topic(settings)
    messages = _messages(3000)
    want = {(f"dev-{i % 10:03d}", i) for i in range(3000)}
    with start_mosquitto(tmp_path / "mosquitto") as mosquitto:
        first = bridge(config, broker.bootstrap, mosquitto.url, tmp_path, client_id="bridge-k")
        errors: list[str] = []
        publisher = publish_in_thread(mosquitto.port, messages, per_tick=50, errors=errors)
        wait_for(lambda: len(read_topic(settings, landing)) >= 500, 60, "500 bridged", first.log)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        # the publisher goes on while no bridge runs: the session queues for it
        second = bridge(config, broker.bootstrap, mosquitto.url, tmp_path, client_id="bridge-k")
        publisher.join(120)
        assert not errors, errors
        got = _wait_landed(settings, want, "every published reading in Kafka", second.log)
        duplicates = len(got) - len(set(got))
        # readings without a device id got the topic's; keys are the device ids
        for key, value in landed(settings, landing)[:50]:
            assert key == orjson.loads(value)["device_id"].encode()
        pipe = Pipeline(config, settings, tmp_path)
        pipe.start("ingest")
        try:
            raw_topic = settings.stages["ingest"].output
            assert raw_topic is not None
            raw: list = []

            def through() -> bool:
                pipe.check_alive()
                raw[:] = read_topic(settings, raw_topic)
                return len({dict(m.headers() or [])["lineage-id"] for m in raw}) >= len(want)

            wait_for(through, 120, "every reading through ingest", pipe.logs)
        finally:
            pipe.stop_all()
        lineage = Counter(dict(m.headers() or [])["lineage-id"] for m in raw)
        # one lineage id per reading, however often it crossed the bridge
        assert len(lineage) == len(want)
        assert set(identities(m.value() for m in raw)) == want
        assert second.stop() == 0, second.log()
        print(
            f"bridged 3000, duplicates in {landing}: {duplicates}, in {raw_topic}: "
            f"{len(raw) - len(lineage)}"
        )


@pytest.mark.timeout(240)
def test_a_mosquitto_restart_is_survived(broker: BrokerHandle, tmp_path: Path) -> None:
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    with start_mosquitto(tmp_path / "mosquitto") as mosquitto:
        door = bridge(config, broker.bootstrap, mosquitto.url, tmp_path, client_id="bridge-r")
        wait_for(lambda: door.metric("pipeline_edge_mqtt_connected") == 1, 30, "connected")
        assert door.stop() == 0  # a clean stop keeps the session on Mosquitto
        publisher = Publisher(mosquitto.port, "pub-r1")
        publisher.publish(_messages(500))  # queued for the stopped bridge's session
        publisher.close()
        mosquitto.restart()  # the queued messages survive in Mosquitto's persistence
        door = bridge(config, broker.bootstrap, mosquitto.url, tmp_path, client_id="bridge-r")
        _wait_landed(
            settings,
            {(f"dev-{i % 10:03d}", i) for i in range(500)},
            "the messages queued across the restart",
            door.log,
        )
        mosquitto.restart()  # now with the bridge connected: it reconnects
        wait_for(
            lambda: door.metric("pipeline_edge_mqtt_connects_total") >= 2,
            60,
            "the bridge reconnected",
            door.log,
        )
        publisher = Publisher(mosquitto.port, "pub-r2")
        publisher.publish(_messages(500, start=500))
        publisher.close()
        _wait_landed(
            settings,
            {(f"dev-{i % 10:03d}", i) for i in range(1000)},
            "every reading after two restarts",
            door.log,
        )
        assert door.get("/healthz")[0] == 200
        assert door.stop() == 0, door.log()


def test_shared_subscriptions_split_the_load_between_replicas(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    shared = ("$share/bridges/devices/+/readings",)
    with start_mosquitto(tmp_path / "mosquitto") as mosquitto:
        doors = [
            bridge(
                config, broker.bootstrap, mosquitto.url, tmp_path, client_id=f"b-{i}", topics=shared
            )
            for i in range(2)
        ]
        try:
            for door in doors:
                wait_for(lambda d=door: d.metric("pipeline_edge_mqtt_connected") == 1, 30, "up")
            publisher = Publisher(mosquitto.port, "pub-s")
            publisher.publish(_messages(1000))
            publisher.close()
            got = _wait_landed(
                settings, {(f"dev-{i % 10:03d}", i) for i in range(1000)}, "all", doors[0].log
            )
            assert len(got) == 1000  # each message to one replica
            counts = [d.metric("pipeline_edge_records_total", door="mqtt") for d in doors]
            assert sum(counts) == 1000
            assert min(counts) > 0, counts
        finally:
            for door in doors:
                door.stop()
