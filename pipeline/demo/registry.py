"""Publishing the built-in example's device registry to its compacted topic."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.errors import ConfigError
from pipeline.kafka.clients import producer
from pipeline.kafka.produce import produce_acked
from pipeline.settings import Settings
from stages.enrich import REGISTRY, Device


def registry_topic(settings: Settings) -> str:
    """The topic of the ``devices`` lookup some stage declares."""
    for stage_id in settings.stage_ids:
        topic = settings.stage(stage_id).lookups.get(REGISTRY)
        if topic is not None:
            return topic
    raise ConfigError(
        f"no stage declares a lookup named {REGISTRY!r} (stages.<id>.lookups); "
        "this config has no device registry"
    )


def publish_registry(settings: Settings, devices: Sequence[Device], timeout: float = 30.0) -> int:
    """Write each device (key = device_id) and wait for acknowledgement; BrokerError
    (one line) if the broker refused or did not acknowledge one."""
    topic = registry_topic(settings)
    produce_acked(
        producer(settings),
        [(topic, d.device_id.encode(), d.to_json(), [], None) for d in devices],
        f"publish the device registry to {topic}",
        timeout=timeout,
    )
    return len(devices)
