"""Publishing the device registry to its compacted topic."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.errors import DeliveryError
from pipeline.kafka.clients import producer
from pipeline.settings import Settings
from stages.enrich import Device


def publish_registry(settings: Settings, devices: Sequence[Device], timeout: float = 30.0) -> int:
    """Write each device (key = device_id) and wait for acknowledgement."""
    topic = settings.stages["enrich"].registry_topic
    assert topic is not None
    client = producer(settings)
    failures: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for device in devices:
        client.produce(topic, device.to_json(), device.device_id.encode(), on_delivery=on_delivery)
        client.poll(0)
    remaining = client.flush(timeout)
    if remaining or failures:
        raise DeliveryError(
            f"{remaining + len(failures)} registry record(s) not acknowledged: {failures[:1]}"
        )
    return len(devices)
