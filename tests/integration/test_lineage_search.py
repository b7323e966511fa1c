"""Bounded reads on a real broker: a time found by bisection, a trace from one
partition of the lineage topic and a bounded number of records."""

from __future__ import annotations

import bisect
import math
import time

import orjson

from pipeline import contract
from pipeline.kafka.clients import producer
from pipeline.kafka.seek import PartitionSeeker, ReadCost
from pipeline.lineage.find import Search, find
from pipeline.lineage.placing import lineage_partition
from pipeline.lineage.trace import trace_many
from pipeline.testing.history import TracedReading, write_lineage
from tests.integration.harness import isolated_config
from tests.integration.test_topics_cli import run_cli

HOUR = 3_600_000


def test_bisection_finds_the_first_record_at_or_after_a_time(broker, tmp_path):
    _, settings = isolated_config(tmp_path, broker.bootstrap)
    topic = settings.stages["ingest"].dlq  # one partition
    base = 1_700_000_000_000
    # timestamps that repeat and jump, never go down
    stamps = [base + (i // 3) * 10 + (5_000 if i > 12_000 else 0) for i in range(20_000)]
    client = producer(settings, **{"linger.ms": 20})
    for ts in stamps:
        client.produce(topic, b"v", b"k", partition=0, timestamp=ts)
    assert client.flush(60) == 0
    targets = [base - 1, base, base + 5, base + 40_000, stamps[12_000] + 1, stamps[-1], base * 2]
    for target in targets:
        cost = ReadCost()
        with PartitionSeeker(settings, cost=cost) as seeker:
            assert seeker.bounds((topic, 0)) == (0, len(stamps))
            offset, how = seeker.offset_for_time((topic, 0), target)
        assert offset == bisect.bisect_left(stamps, target), target
        assert cost.partitions == {(topic, 0)}
        # not a scan: at most ~2·log2(n) probes (bisection steps alternate with
        # interpolation ones, which lose where the times jump)
        assert cost.seeks <= 2 * math.log2(len(stamps)) + 4, (target, how, cost)
        assert cost.records == cost.seeks


def test_a_trace_reads_one_partition_of_the_lineage_and_a_bounded_number_of_records(
    broker, tmp_path
):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    lineage = settings.lineage_topic
    partitions = settings.topics[lineage].partitions
    now = int(time.time() * 1000)
    start = now - 6 * HOUR
    reading = TracedReading(
        contract.lineage_id(start + 3 * HOUR, "dev-7", "42", b"digest"),
        entered_ms=start + 3 * HOUR + 2_000,  # entered 2 s after it was taken
        window=("dev-7", "temperature", start + 3 * HOUR - 10_000),
    )
    # and one taken long before it was sent (a device that buffered for two days)
    late = TracedReading(
        contract.lineage_id(start - 48 * HOUR, "dev-8", "1", b"d"),
        entered_ms=start + 4 * HOUR,
        window=("dev-8", "temperature", start - 48 * HOUR),
    )
    written = write_lineage(settings, 100_000, start, 100_000 / (6 * 3600), [reading, late])

    found = find(settings, reading.lineage_id)
    trace = found.trace
    assert [h["stage"] for h in trace.hops] == ["ingest", "parse", "enrich", "aggregate"]
    assert trace.end == "window" and trace.complete
    assert trace.windows[0]["device_id"] == "dev-7" and trace.windows[0]["count"] == 1
    # the hops from one partition, the result from the reference's and its output
    own = lineage_partition(reading.lineage_id, partitions)
    ref = lineage_partition(orjson.dumps(list(reading.window)), partitions)
    output = settings.stages["aggregate"].output
    assert {tp for tp in found.cost.partitions if tp[0] == lineage} == {
        (lineage, own),
        (lineage, ref),
    }
    assert len([tp for tp in found.cost.partitions if tp[0] == output]) == 1
    # O(log n) to find the start, then a window that stopped once the path was
    # complete: a few dozen of the topic's records
    hops_read = found.searched[0]
    assert hops_read.partition == own and hops_read.stopped == "complete"
    assert hops_read.records <= 2 * math.log2(written) + 30, found.searched
    assert found.cost.records <= 4 * math.log2(written) + 60 < written / 20, found.cost
    # the same path as reading the whole topic
    whole = trace_many(settings, [reading.lineage_id])[reading.lineage_id]
    assert (whole.hops, whole.windows, whole.end) == (trace.hops, trace.windows, trace.end)

    # --within: the whole window is read, up to an hour after the first hop
    window = find(settings, reading.lineage_id, Search(within_ms=HOUR // 2, whole_window=True))
    assert window.searched[0].stopped == "window" and window.trace.hops == trace.hops
    assert window.searched[0].records > hops_read.records

    # the reading sent late: its hops are not near its own time; from when it was
    # sent, they are
    assert find(settings, late.lineage_id).trace.hops == []
    sent = find(settings, late.lineage_id, Search(start_ms=start + 4 * HOUR - 60_000))
    assert sent.trace.end == "window"

    # the command: JSON says what was read; no hop found exits 1 with what to do
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
    shown = run_cli(
        ["--config", str(config), "lineage", "trace", reading.lineage_id, "--json"], env
    )
    assert shown.exit_code == 0, shown.output
    doc = orjson.loads(shown.stdout)
    assert doc["end"] == "window" and doc["searched"][0]["partition"] == own
    missing = run_cli(["--config", str(config), "lineage", "trace", late.lineage_id], env)
    assert missing.exit_code == 1 and "--from" in missing.stderr
