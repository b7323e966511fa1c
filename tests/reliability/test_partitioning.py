"""D3: a device's readings land in the same partition from any process, and where
Kafka's default (murmur2) partitioner would put them, so other clients agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline.kafka.offsets import read_topic
from pipeline.lineage.trace import partition_for
from tests.integration.harness import REPO, isolated_config

PRODUCE = """
import sys
from pipeline.kafka.clients import producer
from pipeline.settings import load_settings
settings = load_settings(sys.argv[1])
client = producer(settings)
for i in range(500):
    key = f"dev-{i:04d}".encode()
    client.produce(sys.argv[2], sys.argv[3].encode(), key)
assert client.flush(30) == 0
"""


def test_keys_are_partitioned_like_kafka_whatever_the_hash_seed(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    topic = settings.stages["parse"].inputs[0]
    partitions = settings.topics[topic].partitions
    for seed in ("1", "2"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": seed,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        }
        done = subprocess.run(
            [sys.executable, "-c", PRODUCE, str(config), topic, seed],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    placed: dict[bytes, dict[str, int]] = {}
    for m in read_topic(settings, topic):
        placed.setdefault(m.key(), {})[m.value().decode()] = m.partition()
    assert len(placed) == 500
    for key, by_seed in placed.items():
        assert by_seed["1"] == by_seed["2"] == partition_for(key, partitions), (key, by_seed)
    spread = json.dumps(sorted({p for v in placed.values() for p in v.values()}))
    assert spread == json.dumps(list(range(partitions)))  # every partition used
