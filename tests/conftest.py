"""Shared fixtures. Integration tests get one real broker per session:
KAFKA_BOOTSTRAP_SERVERS if set, else Kafka in Docker if available, else embedded Tansu."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.kafka.embedded import BrokerHandle, resolve_broker


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "reliability" in parts:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerHandle]:
    handle = resolve_broker(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    try:
        yield handle
    finally:
        handle.stop()
