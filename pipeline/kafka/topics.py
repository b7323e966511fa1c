"""Topic provisioning from pipeline.yaml: create (idempotent) and list."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from pipeline.errors import BrokerError, ConfigError
from pipeline.kafka.clients import broker_error
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class TopicStatus:
    name: str
    partitions: int
    exists: bool
    actual_partitions: int | None
    action: str  # created | exists | mismatch | missing


def _existing(client: AdminClient, timeout: float) -> dict[str, int]:
    try:
        metadata = client.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerError(
            f"cannot read topic metadata: {exc.args[0].str()}; "
            "check KAFKA_BOOTSTRAP_SERVERS and that the broker is up"
        ) from None
    return {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}


def create_topics(
    settings: Settings, client: AdminClient, timeout: float = 15.0
) -> list[TopicStatus]:
    """Create every declared topic that does not exist, with its final partition count.

    Existing topics are left alone; one whose partition count differs is reported
    as ``mismatch`` (partitions are never added behind the operator's back: adding
    them re-maps keys to partitions).
    """
    existing = _existing(client, timeout)
    to_create = [
        NewTopic(name, spec.partitions, -1, config=spec.kafka_config())
        for name, spec in settings.topics.items()
        if name not in existing
    ]
    created: set[str] = set()
    if to_create:
        for name, future in client.create_topics(to_create, request_timeout=timeout).items():
            try:
                future.result()
                created.add(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise BrokerError(f"cannot create topic {name}: {exc.args[0].str()}") from None
        existing = _existing(client, timeout)
    return _statuses(settings, existing, created)


def list_topics(
    settings: Settings, client: AdminClient, timeout: float = 15.0
) -> list[TopicStatus]:
    return _statuses(settings, _existing(client, timeout), created=set())


def _statuses(settings: Settings, existing: dict[str, int], created: set[str]) -> list[TopicStatus]:
    statuses = []
    for name, spec in settings.topics.items():
        actual = existing.get(name)
        if name in created:
            action = "created"
        elif actual is None:
            action = "missing"
        elif actual != spec.partitions:
            action = "mismatch"
        else:
            action = "exists"
        statuses.append(TopicStatus(name, spec.partitions, actual is not None, actual, action))
    return statuses


def check_topics(statuses: list[TopicStatus]) -> None:
    """Raise ConfigError if a declared topic is missing or has other partitions."""
    bad = [s for s in statuses if s.action in ("missing", "mismatch")]
    if bad:
        first = bad[0]
        if first.action == "missing":
            raise ConfigError(f"topic {first.name} does not exist; run `pipeline topics create`")
        raise ConfigError(
            f"topic {first.name} has {first.actual_partitions} partitions, pipeline.yaml says "
            f"{first.partitions}; fix pipeline.yaml or recreate the topic"
        )


def require_topics(client: AdminClient, topics: Iterable[str], timeout: float = 10.0) -> None:
    """Raise ConfigError (naming the fix) unless every topic exists."""
    try:
        metadata = client.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise broker_error("cannot read topic metadata", exc) from None
    for topic in topics:
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            raise ConfigError(f"topic {topic} does not exist; run `pipeline topics create`")


def existing_partitions(client: AdminClient, topic: str, timeout: float = 10.0) -> int:
    """The partition count of ``topic`` as it exists; ConfigError if it does not."""
    count = _existing(client, timeout).get(topic)
    if count is None:
        raise ConfigError(f"topic {topic} does not exist; check the name")
    return count
