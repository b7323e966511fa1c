"""pytest fixtures for testing stages (registered as the ``pipeline`` pytest plugin).

``pipeline_topology(config, **options)`` starts a :class:`TopologyCluster` for the
test and stops it after: a pipeline.yaml's stages as real workers on a real broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.testing.cluster import TopologyCluster


@pytest.fixture
def pipeline_topology(tmp_path: Path) -> Iterator[Callable[..., TopologyCluster]]:
    started: list[TopologyCluster] = []

    def start(config: str | Path, **options: Any) -> TopologyCluster:
        cluster = TopologyCluster(config, tmp_path / f"cluster-{len(started)}", **options)
        started.append(cluster)
        cluster.start()
        return cluster

    yield start
    for cluster in started:
        cluster.stop()
