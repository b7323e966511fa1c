"""One bad record must never stop a partition (issue 14), on a real broker with real
workers: records of every size around every limit, binary among them, mixed into the
simulator's corruptions; dead letters that always fit, that say what they cut, and
whose originals `dlq original` and `dlq replay` read back whole."""

from __future__ import annotations

import hashlib
from collections import Counter

import yaml

from dlq.envelope import MAX_PAYLOAD_BYTES
from pipeline.kafka.clients import producer
from pipeline.kafka.offsets import read_topic
from tests.integration.harness import (
    REGISTRY,
    REPO,
    Pipeline,
    assert_windows_match,
    dead_letters,
    isolated_config,
    publish_devices,
    sent_records,
    wait_for,
    wait_for_all_readings,
)
from tests.integration.test_dlq_runtime import send
from tests.integration.test_topics_cli import run_cli

MIB = 1024 * 1024
INGEST_LIMIT = 65536  # stages.ingest.max_payload_bytes in config/pipeline.yaml
SIZES = (2 * MIB, MIB + 1, MIB, MAX_PAYLOAD_BYTES, INGEST_LIMIT + 1, INGEST_LIMIT)


def text_of(size: int, n: int) -> bytes:
    """Not JSON, valid UTF-8 (ASCII), distinct per (size, n)."""
    head = f"junk-{size}-{n}:".encode()
    return head + b"x" * (size - len(head))


def binary_of(size: int, n: int) -> bytes:
    """Invalid UTF-8 from the first byte, distinct per (size, n)."""
    head = b"\xff\xfe" + f"{size}-{n}".encode()
    return head + bytes(range(128, 256)) * ((size - len(head)) // 128 + 1)


def envelope_size(message) -> int:
    headers = message.headers() or []
    return (
        len(message.key() or b"")
        + len(message.value() or b"")
        + sum(len(k) + len(v or b"") for k, v in headers)
    )


def test_records_of_every_size_and_kind_are_dead_letters_that_fit_and_the_rest_flow(
    broker, tmp_path
):
    # the landing topic takes records up to 8 MiB (a gateway writes what devices send)
    doc = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    doc["topics"]["iot.landing"]["max_message_bytes"] = 8 * MIB
    source = tmp_path / "pipeline.yaml"
    source.write_text(yaml.safe_dump(doc, sort_keys=False))
    config, settings = isolated_config(tmp_path, broker.bootstrap, source=source)
    landing = settings.stages["ingest"].inputs[0]
    publish_devices(settings, REGISTRY)
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    try:
        records = sent_records(1500, seed=14, bad_ratio=0.08)
        kinds = Counter(r.kind for r in records)
        # every corruption the simulator knows is in the mix
        assert set(kinds) >= {
            "good",
            "duplicate",
            "decode_error",
            "schema_violation",
            "out_of_range",
            "too_large",
            "unknown_device",
        }, kinds
        odd: list[tuple[bytes, str, str]] = []  # value, stage, reason
        for n, size in enumerate(SIZES):
            big = "parse" if size <= INGEST_LIMIT else "ingest"
            reason = "decode_error" if size <= INGEST_LIMIT else "too_large"
            odd += [(text_of(size, n), big, reason), (binary_of(size, n)[:size], big, reason)]
        odd.append((bytes(range(256)) * 3, "parse", "decode_error"))  # small binary
        assert sorted({len(v) for v, _, _ in odd}) == sorted({*SIZES, 768})
        # keys partitioned as the stages do (murmur2): with another partitioner the
        # devices of one landing partition spread over all of ingest's output
        # partitions, and a partition held up by huge records makes its readings late
        big_producer = producer(settings, **{"message.max.bytes": 8 * MIB + 65536})
        third = len(records) // 3
        for part in (
            [(r.key, r.value) for r in records[:third]],
            [(b"gateway-7", value) for value, _, _ in odd],
            [(r.key, r.value) for r in records[third:]],
        ):
            for key, value in part:
                big_producer.produce(landing, value, key)
                big_producer.poll(0)
            assert big_producer.flush(60) == 0

        got = wait_for_all_readings(pipe, kinds["good"], timeout=240)
        assert_windows_match(records, got)  # every valid reading counted exactly once

        want = {
            stage: Counter(
                [(r.kind, r.value) for r in records if r.stage == stage]
                + [(reason, value) for value, s, reason in odd if s == stage]
            )
            for stage in settings.stage_ids
        }
        for stage in settings.stage_ids:
            wait_for(
                lambda stage=stage: len(dead_letters(settings, stage)) >= sum(want[stage].values()),
                60,
                f"{stage} dead letters",
                pipe.logs,
            )
        by_value = {value: (stage, reason) for value, stage, reason in odd}
        truncated: list = []
        for stage in settings.stage_ids:
            have = Counter()
            for m in dead_letters(settings, stage):
                h = dict(m.headers())
                assert envelope_size(m) <= MAX_PAYLOAD_BYTES  # every dead letter fits
                value = m.value() or b""
                if h.get("dlq.payload.truncated") == b"true":
                    size = int(h["dlq.payload.size"])
                    original = next(v for v in by_value if len(v) == size and v.startswith(value))
                    assert h["dlq.payload.sha256"] == hashlib.sha256(original).hexdigest().encode()
                    assert len(value) < size
                    value = original
                    truncated.append(m)
                else:
                    assert "dlq.payload.size" not in h
                have[(h["dlq.reason"].decode(), value)] += 1
            assert have == want[stage], stage
        # what did not fit in 256 KiB with its envelope was cut, and only that
        cut = sorted(int(dict(m.headers())["dlq.payload.size"]) for m in truncated)
        assert cut == sorted(len(v) for v, _, _ in odd if len(v) >= MAX_PAYLOAD_BYTES)
        pipe.check_alive()  # no worker exited on the way

        env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
        base = ["--config", str(config), "dlq"]
        two_mib = next(
            m for m in truncated if dict(m.headers())["dlq.payload.size"] == b"%d" % (2 * MIB)
        )
        ref = f"ingest:{two_mib.partition()}:{two_mib.offset()}"
        shown = run_cli([*base, "show", ref], env)
        assert shown.exit_code == 0, shown.output
        assert f"of {2 * MIB} bytes kept" in shown.stdout
        assert f"pipeline dlq original {ref} --out FILE" in shown.stdout
        out = tmp_path / "original.bin"
        whole = run_cli([*base, "original", ref, "--out", str(out)], env)
        assert whole.exit_code == 0, whole.output
        assert out.read_bytes() in by_value and len(out.read_bytes()) == 2 * MIB

        # replay: the originals go back whole (not their prefixes) and are dead
        # letters again, with replay-count 1
        before = len(dead_letters(settings, "ingest"))
        replayed = run_cli([*base, "replay", "--stage", "ingest", "--reason", "too_large"], env)
        assert replayed.exit_code == 0, replayed.output
        n_too_large = sum(v for (r, _), v in want["ingest"].items() if r == "too_large")
        assert f"sent {n_too_large} dead letter(s)" in replayed.stdout, replayed.output
        back = [m for m in read_topic(settings, landing) if dict(m.headers() or []).get(
            "dlq.replay-count") == b"1"]  # fmt: skip
        assert sorted(len(m.value() or b"") for m in back) == sorted(
            [len(r.value) for r in records if r.kind == "too_large"]
            + [len(v) for v, s, _ in odd if s == "ingest"]
        )
        wait_for(
            lambda: len(dead_letters(settings, "ingest")) >= before + n_too_large,
            60,
            "the replayed records dead-lettered again",
            pipe.logs,
        )
        again = dead_letters(settings, "ingest")[before:]
        assert all(dict(m.headers())["dlq.replay-count"] == b"1" for m in again)
        assert all(envelope_size(m) <= MAX_PAYLOAD_BYTES for m in again)
        pipe.check_alive()
    finally:
        pipe.stop_all()


def test_dlq_original_and_replay_refuse_an_original_that_is_not_there_any_more(broker, tmp_path):
    """A truncated dead letter whose source record was replaced (a recreated topic)
    or never reached: one line saying so, nothing replayed, never the prefix."""
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    landing = settings.stages["ingest"].inputs[0]
    dlq = settings.stages["ingest"].dlq
    (other,) = send(settings, landing, [(b"k", b"a different record", [])], partition=0)
    prefix = b"x" * 1000
    digest = hashlib.sha256(b"x" * 5000).hexdigest().encode()

    def letter(offset: int) -> tuple[bytes, bytes, list]:
        return (
            b"k",
            prefix,
            [
                ("dlq.stage", b"ingest"),
                ("dlq.reason", b"too_large"),
                ("dlq.error.class", b"InvalidMessage"),
                ("dlq.error.message", b"payload of 5000 bytes exceeds 4096"),
                ("dlq.original.topic", landing.encode()),
                ("dlq.original.partition", b"0"),
                ("dlq.original.offset", str(offset).encode()),
                ("dlq.original.timestamp", b"1767225600000"),
                ("dlq.failed-at", b"1767225600000"),
                ("dlq.attempts", b"1"),
                ("dlq.replay-count", b"0"),
                ("dlq.payload.truncated", b"true"),
                ("dlq.payload.size", b"5000"),
                ("dlq.payload.sha256", digest),
            ],
        )

    replaced, missing = send(settings, dlq, [letter(other), letter(other + 100)], partition=0)
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
    base = ["--config", str(config), "dlq"]
    out = tmp_path / "o.bin"
    first = run_cli([*base, "original", f"ingest:0:{replaced}", "--out", str(out)], env)
    assert first.exit_code == 1 and "digest differs" in first.output, first.output
    assert len(first.output.strip().splitlines()) == 1
    second = run_cli([*base, "original", f"ingest:0:{missing}", "--out", str(out)], env)
    assert second.exit_code == 1 and "was not found" in second.output, second.output
    assert not out.exists()
    replay = run_cli([*base, "replay", "--stage", "ingest"], env)
    assert replay.exit_code == 0, replay.output
    assert "sent 0 dead letter(s)" in replay.stdout
    assert replay.stdout.count("not replayed:") == 2
    assert [m.value() for m in read_topic(settings, landing)] == [b"a different record"]
