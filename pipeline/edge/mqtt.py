"""The MQTT bridge: topic filters on an MQTT broker into the ingest stage's input.

Delivery contract (at-least-once, end to end):

* it subscribes with QoS 1 in a **persistent session** (MQTT 5, ``clean_start``
  false, a fixed client id, ``session_expiry_s``), so messages published while it
  is down wait on the MQTT broker;
* each message is produced to Kafka (key = device id) and **acknowledged to the
  MQTT broker (PUBACK) only once Kafka acknowledged it** (paho's manual acks);
* a bridge killed at any point loses nothing: what Kafka had not acknowledged was
  not acknowledged to MQTT either, and the MQTT broker sends it again to the next
  bridge with the same client id. What Kafka had acknowledged may come again
  (killed before the PUBACK went out): a duplicate with the same bytes, which
  ingest drops as a repeat and the aggregate recognises by its lineage id;
* an acknowledgement is sent only on the connection the message came on: after a
  reconnect the MQTT broker re-sends unacknowledged messages (same packet ids), so
  an old packet id is never acknowledged on a new connection, where it may name
  another message;
* it reconnects with backoff (``reconnect_min_s`` … ``reconnect_max_s``); Kafka
  delivery failures (broker down) are produced again until they are acknowledged;
* ``$share/<group>/<filter>`` subscriptions split messages between replicas.

The device id is the topic level at the filter's first ``+`` (``devices/+/readings``):
a payload that names no device gets it (:func:`pipeline.edge.split.with_device_id`).
A payload naming another device than its topic is forwarded as sent and counted
(``pipeline_edge_device_mismatch_total``): authorising publishers is the MQTT
broker's job (ACLs such as ``pattern write devices/%u/readings``).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from confluent_kafka import KafkaError, Message, Producer
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from pipeline.edge.split import with_device_id
from pipeline.edge.writer import BrokerProbe, target_topic
from pipeline.errors import ConfigError
from pipeline.kafka.clients import producer
from pipeline.kafka.produce import PERMANENT
from pipeline.obs.health import HEALTH, serve
from pipeline.obs.metrics import (
    EDGE_DEVICE_MISMATCH,
    EDGE_IN_FLIGHT,
    EDGE_MQTT_CONNECTED,
    EDGE_MQTT_CONNECTS,
    EDGE_RECORDS,
    EDGE_REJECTED,
)
from pipeline.settings import Settings

log = logging.getLogger("pipeline.edge.mqtt")

#: CONNACK reason codes that retrying cannot fix
_FATAL = {"Bad user name or password", "Not authorized", "Client identifier not valid"}


def parse_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` → (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"MQTT URL {url!r}: use mqtt://host:port or mqtts://host:port")
    if parts.username or parts.password:
        raise ConfigError(
            "MQTT URL: no credentials in the URL; set PIPELINE_EDGE__MQTT__USERNAME/PASSWORD"
        )
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"MQTT URL {url!r}: the port is not a number") from None
    return parts.hostname, port, tls


def check_filter(topic_filter: str) -> str:
    """A valid MQTT topic filter (``+`` and ``#`` whole levels, ``#`` last); ConfigError."""
    body = _without_share(topic_filter)
    levels = body.split("/")
    if not body or any(
        ("+" in lvl and lvl != "+") or ("#" in lvl and (lvl != "#" or i != len(levels) - 1))
        for i, lvl in enumerate(levels)
    ):
        raise ConfigError(
            f"topic filter {topic_filter!r}: '+' and '#' must be whole levels, '#' the last"
        )
    return topic_filter


def _without_share(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1]:
            raise ConfigError(f"topic filter {topic_filter!r}: use $share/<group>/<filter>")
        return parts[2]
    return topic_filter


def topic_device(topic: str, filters: tuple[str, ...]) -> str | None:
    """The device id in ``topic``: its level at the first ``+`` of the first filter it
    matches; None when no matching filter has a ``+``."""
    levels = topic.split("/")
    for topic_filter in filters:
        wanted = _without_share(topic_filter).split("/")
        device: str | None = None
        matched = True
        for i, part in enumerate(wanted):
            if part == "#":
                break  # the rest of the topic, whatever it is
            if i >= len(levels):
                matched = False
                break
            if part == "+":
                if device is None:
                    device = levels[i]
            elif part != levels[i]:
                matched = False
                break
        else:
            matched = len(levels) == len(wanted)
        if matched and device:
            return device
    return None


@dataclass(frozen=True)
class BridgeOptions:
    host: str
    port: int
    tls: bool
    topics: tuple[str, ...]
    client_id: str
    kafka_topic: str

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        url: str | None,
        topics: tuple[str, ...],
        client_id: str | None,
    ) -> BridgeOptions:
        if not url:
            raise ConfigError("no MQTT broker: pass --mqtt mqtt://host:port (or edge.mqtt.url)")
        if not topics:
            raise ConfigError("no topic filter: pass --topic 'devices/+/readings' (repeatable)")
        host, port, tls = parse_url(url)
        return cls(
            host=host,
            port=port,
            tls=tls,
            topics=tuple(check_filter(t) for t in topics),
            client_id=client_id or f"{settings.app_prefix}-bridge-{socket.gethostname()}",
            kafka_topic=target_topic(settings),
        )


class Bridge:
    """One bridge process: a paho client (its own network thread) and a Kafka producer
    whose delivery reports, served by :meth:`run`'s thread, send the PUBACKs."""

    def __init__(self, settings: Settings, options: BridgeOptions) -> None:
        self.settings = settings
        self.options = options
        self.mqtt = settings.edge.mqtt
        self.stop = threading.Event()
        self.fatal: str | None = None
        self._generation = 0
        self._connected = False
        self._disconnected_at: float | None = time.monotonic()
        self._stopping = False
        self._retries: deque[tuple[float, int, int, int, bytes | None, bytes]] = deque()
        self.in_flight = 0
        self._lock = threading.Lock()
        self._producer: Producer = producer(settings)
        self._acked = EDGE_RECORDS.labels("mqtt", options.kafka_topic)
        self._gauge = EDGE_IN_FLIGHT.labels("mqtt")
        self.client = self._client()

    def _client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.options.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if self.mqtt.username:
            password = self.mqtt.password.get_secret_value() if self.mqtt.password else None
            client.username_pw_set(self.mqtt.username, password)
        if self.options.tls:
            client.tls_set(ca_certs=self.mqtt.ca_file)
        client.reconnect_delay_set(
            max(1, int(self.mqtt.reconnect_min_s)), max(1, int(self.mqtt.reconnect_max_s))
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.enable_logger(logging.getLogger("pipeline.edge.paho"))
        return client

    # -- paho's thread ---------------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            text = str(reason)
            log.warning("the MQTT broker refused the connection: %s", text)
            if text in _FATAL:
                self.fatal = f"the MQTT broker refused the connection: {text}"
                self.stop.set()
            return
        with self._lock:
            self._generation += 1
            self._connected = True
            self._disconnected_at = None
        options = SubscribeOptions(qos=1)
        client.subscribe([(t, options) for t in self.options.topics])
        EDGE_MQTT_CONNECTS.inc()
        EDGE_MQTT_CONNECTED.set(1)
        log.info(
            "connected to %s:%d (session present: %s)",
            self.options.host,
            self.options.port,
            getattr(flags, "session_present", "?"),
        )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._connected = False
            self._disconnected_at = time.monotonic()
        EDGE_MQTT_CONNECTED.set(0)
        if not self._stopping:
            log.warning("disconnected from the MQTT broker (%s); reconnecting", reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if self._stopping:
            return  # not acknowledged: the MQTT broker sends it again to the next bridge
        generation = self._generation
        payload = bytes(message.payload)
        if len(payload) > self.mqtt.max_payload_bytes:
            EDGE_REJECTED.labels("mqtt", "too_large").inc()
            log.warning(
                "a message of %d bytes is over edge.mqtt.max_payload_bytes (%d): dropped",
                len(payload),
                self.mqtt.max_payload_bytes,
            )
            self._ack(generation, message.mid, message.qos)
            return
        device = topic_device(message.topic, self.options.topics)
        key: bytes | None = None
        if device is not None:
            value, named = with_device_id(payload, device)
            if named != device:
                EDGE_DEVICE_MISMATCH.inc()
            key = named.encode("utf-8")
        else:
            value = payload
        with self._lock:
            self.in_flight += 1
        self._gauge.set(self.in_flight)
        self._produce(generation, message.mid, message.qos, key, value)

    # -- Kafka ------------------------------------------------------------------------

    def _produce(
        self, generation: int, mid: int, qos: int, key: bytes | None, value: bytes
    ) -> None:
        callback = partial(self._delivered, generation, mid, qos, key, value)
        while True:
            try:
                self._producer.produce(self.options.kafka_topic, value, key, on_delivery=callback)
                return
            except BufferError:
                time.sleep(0.01)  # run()'s thread serves the reports that make room

    def _delivered(
        self,
        generation: int,
        mid: int,
        qos: int,
        key: bytes | None,
        value: bytes,
        err: KafkaError | None,
        msg: Message,
    ) -> None:
        if err is None:
            self._acked.inc()
            self._done()
            self._ack(generation, mid, qos)
            return
        if err.code() in PERMANENT:
            EDGE_REJECTED.labels("mqtt", "refused").inc()
            log.warning("Kafka refused a message for good (%s): dropped", err.str())
            self._done()
            self._ack(generation, mid, qos)
            return
        # transient (broker down, timeout): again, until acknowledged
        self._retries.append((time.monotonic() + 1.0, generation, mid, qos, key, value))

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1
        self._gauge.set(self.in_flight)

    def _ack(self, generation: int, mid: int, qos: int) -> None:
        if qos == 0:
            return
        with self._lock:
            current = self._connected and generation == self._generation
        if current:
            self.client.ack(mid, qos)
        # else: the message came on an earlier connection; the MQTT broker sends it
        # again on this one (a duplicate downstream, never a loss)

    # -- the bridge's own thread -----------------------------------------------------------

    def run(self) -> int:
        """Bridge until :attr:`stop` is set; 0 after a clean stop, 2 on a fatal refusal."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.mqtt.session_expiry_s
        props.ReceiveMaximum = self.mqtt.max_in_flight
        self.client.connect_async(
            self.options.host,
            self.options.port,
            keepalive=self.mqtt.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()
        try:
            while not self.stop.is_set():
                self._producer.poll(0.05)
                self._retry_due()
        finally:
            self._shutdown()
        return 2 if self.fatal else 0

    def _retry_due(self) -> None:
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            _, generation, mid, qos, key, value = self._retries.popleft()
            self._produce(generation, mid, qos, key, value)

    def _shutdown(self) -> None:
        """Stop taking messages, let Kafka acknowledge what is in flight and send
        those PUBACKs, then disconnect (the session stays on the MQTT broker)."""
        self._stopping = True
        deadline = time.monotonic() + 10.0
        while (self.in_flight > 0 or self._retries) and time.monotonic() < deadline:
            self._producer.poll(0.05)
            self._retry_due()
        time.sleep(0.2)  # the network thread writes the last PUBACKs
        self.client.disconnect()
        self.client.loop_stop()
        self._producer.flush(5.0)

    def problem(self) -> str | None:
        with self._lock:
            since = self._disconnected_at
        if since is not None and time.monotonic() - since > 2 * self.mqtt.keepalive_s:
            return f"not connected to the MQTT broker for {time.monotonic() - since:.0f}s"
        return None

    def ready(self) -> bool:
        with self._lock:
            return self._connected


def run_bridge(settings: Settings, options: BridgeOptions) -> int:
    """Run a bridge in this process until SIGTERM/SIGINT; the exit code."""
    probe = BrokerProbe(settings)
    if probe.check() and options.kafka_topic not in probe.topics:
        raise ConfigError(
            f"topic {options.kafka_topic} does not exist; run `pipeline topics create`"
        )
    probe.start()
    bridge = Bridge(settings, options)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        bridge.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    HEALTH.watch("mqtt", bridge.problem)
    HEALTH.watch("broker", probe.problem)
    if settings.metrics_port is not None:
        port = serve(settings.metrics_host, settings.metrics_port)
        log.info("metrics on %s:%d", settings.metrics_host, port)
    ready = threading.Thread(target=_ready_loop, args=(bridge,), daemon=True)
    ready.start()
    log.info(
        "bridging %s from %s:%d to %s as %s",
        ", ".join(options.topics),
        options.host,
        options.port,
        options.kafka_topic,
        options.client_id,
    )
    code = bridge.run()
    probe.stop()
    if bridge.fatal:
        raise ConfigError(bridge.fatal + "; check PIPELINE_EDGE__MQTT__USERNAME/PASSWORD")
    return code


def _ready_loop(bridge: Bridge) -> None:
    while not bridge.stop.is_set():
        HEALTH.set_ready(bridge.ready())
        bridge.stop.wait(0.5)
