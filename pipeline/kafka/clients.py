"""confluent-kafka clients built from settings.

Every Kafka client the project creates gets its connection and security settings
from :func:`client_config`, so SASL/TLS flow everywhere from one place.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
)
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError
from pipeline.settings import Settings


def bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap_servers:
        raise BrokerError(
            "no broker configured; set KAFKA_BOOTSTRAP_SERVERS or run `pipeline broker`"
        )
    return settings.kafka_bootstrap_servers


#: librdkafka's own log lines go here (not straight to stderr); the CLI silences
#: it, stage workers log it.
RDKAFKA_LOG = logging.getLogger("pipeline.rdkafka")


class RepeatFilter(logging.Filter):
    """Lets a kind of line through once per ``every_s``: librdkafka repeats a failing
    connection several times a second per client while a broker is down, which
    buried everything else in a worker's log. A kind is the message with its
    numbers (ports, counters, timings) blanked."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = re.sub(r"\d+", "#", record.getMessage())[:120]
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[kind] = now
        return True


_filtered: list[RepeatFilter] = []


def install_log_filter() -> None:
    """Put a :class:`RepeatFilter` on :data:`RDKAFKA_LOG` (once per process). Called by
    the composition roots (the CLI, a worker), never at import."""
    if not _filtered:
        _filtered.append(RepeatFilter())
        RDKAFKA_LOG.addFilter(_filtered[0])


def client_config(settings: Settings) -> dict[str, Any]:
    """Connection and security settings shared by every confluent-kafka client."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap(settings),
        "security.protocol": settings.kafka_security_protocol,
        "logger": RDKAFKA_LOG,
    }
    if settings.kafka_sasl_mechanism:
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username:
        config["sasl.username"] = settings.kafka_sasl_username
    if settings.kafka_sasl_password is not None:
        config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_cafile:
        config["ssl.ca.location"] = settings.kafka_ssl_cafile
    return config


def broker_error(what: str, exc: KafkaException) -> BrokerError:
    """A one-line BrokerError for a failed client call: what failed, why, what to check."""
    err = exc.args[0] if exc.args else exc
    text = err.str() if isinstance(err, KafkaError) else str(err)
    return BrokerError(f"{what}: {text}; check KAFKA_BOOTSTRAP_SERVERS and that the broker is up")


def wait_for_broker(settings: Settings, timeout: float) -> None:
    """Return once the configured cluster answers a metadata request (with the
    project's security settings); BrokerError after ``timeout`` seconds."""
    client = AdminClient({**client_config(settings), "socket.timeout.ms": 2000})
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            client.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            last = exc.args[0].str() if exc.args else str(exc)
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"no Kafka broker answered at {bootstrap(settings)} within {timeout:.0f}s "
                f"({last}); check KAFKA_BOOTSTRAP_SERVERS and the security settings"
            )
        time.sleep(0.5)


def admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent producer that partitions keys like Kafka's Java client (murmur2)."""
    return Producer(producer_config(settings, **overrides))


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """The configuration :func:`producer` uses (also what the benchmarks compare)."""
    return {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 1,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "partitioner": "murmur2_random",
        "message.timeout.ms": 60000,
        "message.max.bytes": settings.runner.max_message_bytes,
        **overrides,
    }


def consumer(settings: Settings, group_id: str | None = None, **overrides: Any) -> Consumer:
    """A consumer; without ``group_id`` a throwaway group that never commits."""
    config = {
        **client_config(settings),
        "group.id": group_id or f"pipeline-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
        **overrides,
    }
    return Consumer(config)
