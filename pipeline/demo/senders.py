"""How the simulator's records reach the pipeline: straight to Kafka, through the
HTTP gateway, or through an MQTT broker and the bridge (``--via``).

Each sender takes records one at a time and returns from :meth:`close` only once
every record it took was acknowledged by the door (Kafka, a 202, a PUBACK). A
record a door cannot carry (HTTP: an empty or non-UTF-8 record; the body would be
refused whole) is not sent and is counted in ``not_sendable``.
"""

from __future__ import annotations

import http.client
import time
from typing import Protocol
from urllib.parse import urlsplit

from pipeline.demo.simulator import SimRecord
from pipeline.errors import ConfigError, DeliveryError
from pipeline.kafka.clients import producer
from pipeline.settings import Settings


class Sender(Protocol):
    not_sendable: int

    def send(self, record: SimRecord) -> None: ...

    def close(self) -> None: ...


class KafkaSender:
    """To the entry stage's input topic with a murmur2-partitioning producer."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._client = producer(settings)
        self._topic = topic
        self.not_sendable = 0

    def send(self, record: SimRecord) -> None:
        while True:
            try:
                self._client.produce(self._topic, record.value, record.key)
                break
            except BufferError:
                self._client.poll(0.05)
        self._client.poll(0)

    def close(self) -> None:
        if self._client.flush(30):
            raise DeliveryError("simulator: records were not acknowledged within 30 s")


class HttpSender:
    """NDJSON batches to ``POST /v1/readings`` (every ``batch`` records or
    ``linger_s``), again after Retry-After on 429/503."""

    def __init__(self, url: str, token: str, batch: int = 100, linger_s: float = 0.1) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"gateway URL {url!r}: use http://host:port")
        self._host, self._port = parts.hostname, parts.port or 80
        self._token = token
        self._batch = batch
        self._linger = linger_s
        self._pending: list[bytes] = []
        self._since = time.monotonic()
        self._conn = http.client.HTTPConnection(self._host, self._port, timeout=60)
        self.not_sendable = 0

    def send(self, record: SimRecord) -> None:
        value = record.value.strip()
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            value = b""
        if not value or b"\n" in value:
            self.not_sendable += 1
            return
        if not self._pending:
            self._since = time.monotonic()
        self._pending.append(value)
        if len(self._pending) >= self._batch or time.monotonic() - self._since >= self._linger:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        body = b"\n".join(self._pending) + b"\n"
        for _ in range(120):
            status, retry_after, text = self._post(body)
            if status == 202:
                self._pending = []
                return
            if status in (429, 503):
                time.sleep(retry_after)
                continue
            raise DeliveryError(f"the gateway answered {status}: {text}")
        raise DeliveryError("the gateway kept answering 429/503")

    def _post(self, body: bytes) -> tuple[int, float, str]:
        headers = {
            "Content-Type": "application/x-ndjson",
            "Authorization": f"Bearer {self._token}",
        }
        try:
            self._conn.request("POST", "/v1/readings", body, headers)
            response = self._conn.getresponse()
            text = response.read().decode(errors="replace")[:200]
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = http.client.HTTPConnection(self._host, self._port, timeout=60)
            return 503, 1.0, "no answer"
        return response.status, float(response.getheader("Retry-After") or 1), text

    def close(self) -> None:
        self._flush()
        self._conn.close()


class MqttSender:
    """QoS 1 publishes to ``devices/<device>/readings`` (``devices/unknown/readings``
    without a key); :meth:`close` waits for every PUBACK."""

    def __init__(self, url: str, topic_pattern: str = "devices/{device}/readings") -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from pipeline.edge.mqtt import parse_url

        host, port, tls = parse_url(url)
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self._client.max_queued_messages_set(0)
        if tls:
            self._client.tls_set()
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        self._pattern = topic_pattern
        self._infos: list[object] = []
        self.not_sendable = 0

    def send(self, record: SimRecord) -> None:
        device = record.key.decode("utf-8", "replace") if record.key else "unknown"
        info = self._client.publish(self._pattern.format(device=device), record.value, qos=1)
        self._infos.append(info)
        if len(self._infos) >= 1000:
            self._wait()

    def _wait(self) -> None:
        for info in self._infos:
            info.wait_for_publish(60)  # type: ignore[attr-defined]
            if not info.is_published():  # type: ignore[attr-defined]
                raise DeliveryError("the MQTT broker did not acknowledge a publish in 60 s")
        self._infos = []

    def close(self) -> None:
        self._wait()
        self._client.disconnect()
        self._client.loop_stop()
