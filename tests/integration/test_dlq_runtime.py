"""Dead letters, retries and the dead-letter budget on a real broker, real workers."""

from __future__ import annotations

import json
import time

import orjson
from confluent_kafka import Message

from pipeline import contract
from pipeline.kafka.clients import admin, producer
from pipeline.kafka.offsets import committed_offsets, read_topic
from stages.enrich import Device
from tests.integration.harness import (
    REGISTRY,
    Pipeline,
    aggregates,
    dead_letters,
    isolated_config,
    publish_devices,
    wait_for,
)
from tests.integration.test_topics_cli import run_cli


def parsed(device: str, ts: int, seq: int, value: float = 20.0) -> tuple[bytes, bytes, list]:
    """A reading/1 record as parse writes it: key, value, headers."""
    body = {"device_id": device, "ts": ts, "seq": seq, "metric": "temperature", "value": value}
    body["unit"] = "C"
    headers = [
        (contract.H_LINEAGE, contract.lineage_id(ts, device, seq).encode()),
        (contract.H_SCHEMA, contract.SCHEMA_READING.encode()),
        (contract.H_SOURCE, b"live"),
    ]
    return device.encode(), orjson.dumps(body), headers


def send(settings, topic: str, records, partition: int | None = None) -> list[int]:
    """Produce and return each record's offset, in order."""
    client = producer(settings)
    offsets: dict[int, int] = {}

    def delivered(i):
        def callback(err, msg):
            assert err is None, err
            offsets[i] = msg.offset()

        return callback

    for i, (key, value, headers) in enumerate(records):
        kwargs = {} if partition is None else {"partition": partition}
        client.produce(topic, value, key, headers=headers, on_delivery=delivered(i), **kwargs)
        client.poll(0)
    assert client.flush(30) == 0
    return [offsets[i] for i in range(len(records))]


def header(message: Message, name: str) -> bytes | None:
    return dict(message.headers() or []).get(name)


def device_of(message: Message) -> str:
    return orjson.loads(message.value())["device_id"]


def test_unknown_device_is_retried_without_blocking_then_dead_lettered_and_redriven(
    broker, tmp_path
):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    parsed_topic = settings.stages["enrich"].inputs[0]
    enriched_topic = settings.stages["enrich"].output
    pipe = Pipeline(config, settings, tmp_path)
    slow_retries = {
        "PIPELINE_STAGES__ENRICH__RETRY__MAX_ATTEMPTS": "3",
        "PIPELINE_STAGES__ENRICH__RETRY__BACKOFF_S": "6",
        "PIPELINE_STAGES__ENRICH__RETRY__BACKOFF_MAX_S": "6",
    }
    enrich = pipe.start("enrich", env=slow_retries)
    pipe.start("aggregate")
    try:
        base = int(time.time() * 1000) - 3_600_000
        base -= base % 5000
        late_device_ts = base + 600_000  # far ahead: its window is still open after redrive
        unknown = [parsed("dev-new", base + i * 1000, i) for i in range(3)]
        never = [parsed("dev-never", late_device_ts, 0)]
        never_offset = send(settings, parsed_topic, never + unknown, partition=0)[0]
        wait_for(
            lambda: (
                enrich.counter("pipeline_retries_total") >= 4
                and enrich.counter("pipeline_retry_waiting") == 1
            ),
            60,
            "four records waiting for a retry",
            pipe.logs,
        )
        # The live path goes on while they wait: readings produced after the
        # unknown ones are enriched while those still wait for their retry.
        live = [parsed("dev-0001", base + i * 1000, i) for i in range(3)]
        send(settings, parsed_topic, live, partition=0)
        wait_for(
            lambda: len(read_topic(settings, enriched_topic)) >= 3,
            30,
            "live readings enriched",
            pipe.logs,
        )
        assert enrich.counter("pipeline_retry_waiting") == 1
        assert [device_of(m) for m in read_topic(settings, enriched_topic)] == ["dev-0001"] * 3
        assert not dead_letters(settings, "enrich")
        publish_devices(settings, [Device("dev-new", "site-new", "thermo", "C")])

        def settled() -> bool:
            pipe.check_alive()
            return len(dead_letters(settings, "enrich")) >= 1 and {
                (w["device_id"], w["count"]) for w in aggregates(settings)
            } >= {("dev-new", 3), ("dev-0001", 3)}

        wait_for(settled, 90, "dev-new aggregated and dev-never dead-lettered", pipe.logs)
        enriched = read_topic(settings, enriched_topic)
        assert sorted(device_of(m) for m in enriched) == ["dev-0001"] * 3 + ["dev-new"] * 3
        assert all(not k.startswith("retry.") for m in enriched for k, _ in m.headers() or [])
        (dead,) = dead_letters(settings, "enrich")
        assert device_of(dead) == "dev-never"
        assert header(dead, "dlq.reason") == b"unknown_device"
        assert header(dead, "dlq.attempts") == b"3"
        assert header(dead, "dlq.original.topic") == parsed_topic.encode()
        assert header(dead, "dlq.original.offset") == str(never_offset).encode()
        assert header(dead, "dlq.replay-count") == b"0"
        assert header(dead, contract.H_LINEAGE) == never[0][2][0][1]
        assert not [k for k, _ in dead.headers() if k.startswith("retry.")]

        # Redrive: the cause is fixed (the device registered), the dead letter replayed.
        publish_devices(settings, [Device("dev-never", "site-x", "thermo", "C")])
        args = ["--config", str(config), "dlq", "replay", "--stage", "enrich", "--json"]
        env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
        dry = run_cli([*args, "--dry-run"], env)
        assert dry.exit_code == 0, dry.output
        assert len(read_topic(settings, parsed_topic)) == 7  # dry run sent nothing
        done = run_cli(args, env)
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout)["sent"] == {"unknown_device": 1}, done.output
        wait_for(
            lambda: (
                ("dev-never", 1) in {(w["device_id"], w["count"]) for w in aggregates(settings)}
            ),
            90,
            "the redriven reading aggregated",
            pipe.logs,
        )
        replayed = [m for m in read_topic(settings, parsed_topic) if device_of(m) == "dev-never"]
        counts = sorted(header(m, "dlq.replay-count") or b"-" for m in replayed)
        assert counts == [b"-", b"1"], counts
        assert len(dead_letters(settings, "enrich")) == 1  # no new dead letter
    finally:
        pipe.stop_all()


def test_a_stream_of_only_bad_records_stops_the_stage_instead_of_dead_lettering_it(
    broker, tmp_path
):
    config, settings = isolated_config(
        tmp_path,
        broker.bootstrap,
        stages={"parse": {"dlq_budget": {"max_consecutive": 20, "min_records": 1000}}},
    )
    raw = settings.stages["parse"].inputs[0]
    pipe = Pipeline(config, settings, tmp_path)
    parse = pipe.start("parse")
    try:
        wait_for(lambda: parse.get("/readyz")[0] == 200, 60, "parse ready", pipe.logs)
        assert parse.get("/healthz")[0] == 200
        send(settings, raw, [(b"k", b"not json at all %d" % i, []) for i in range(300)], 0)
        wait_for(
            lambda: parse.counter("pipeline_stage_stopped") == 1,
            60,
            "parse to stop on its dead-letter budget",
            pipe.logs,
        )
        status, body = parse.get("/healthz")
        assert status == 503
        assert "consecutive dead letters" in json.loads(body)["problems"]["dlq_budget"]
        assert parse.get("/readyz")[0] == 503
        assert parse.alive()
        time.sleep(2)  # it stays stopped: nothing more is dead-lettered or committed
        dead = dead_letters(settings, "parse")
        assert len(dead) < 20, len(dead)
        committed = committed_offsets(admin(settings), settings.group_id("parse"), [(raw, 0)])
        assert (committed[(raw, 0)] or 0) == len(dead)
        assert not read_topic(settings, settings.stages["parse"].output)
        assert "stopped consuming" in parse.log_path.read_text()
    finally:
        pipe.stop_all()


def test_worker_killed_between_dead_letter_and_commit_loses_nothing(broker, tmp_path):
    """The dead letter is acknowledged before the offset is committed: a SIGKILL
    in between re-delivers the batch (a duplicate dead letter, never a lost one)."""
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    raw = settings.stages["parse"].inputs[0]
    now = int(time.time() * 1000)
    records = []
    for i in range(60):
        body = {"device_id": "dev-0001", "ts": now - 60_000 + i, "seq": i, "metric": "power"}
        body |= {"value": 5.0, "unit": "W"}
        value = b"garbage %d" % i if i % 10 == 3 else orjson.dumps(body)
        records.append((b"dev-0001", value, [(contract.H_LINEAGE, b"L%d" % i)]))
    bad_offsets = {o for o, r in zip(range(60), records, strict=True) if r[1].startswith(b"g")}
    pipe = Pipeline(config, settings, tmp_path)
    first = pipe.start("parse", env={"PIPELINE_FAILPOINT": "dlq-delivered"})
    try:
        assert send(settings, raw, records, partition=0) == list(range(60))
        wait_for(lambda: not first.alive(), 60, "the failpoint to kill parse", pipe.logs)
        assert first.proc is not None and first.proc.returncode == -9
        before = dead_letters(settings, "parse")
        assert before, "killed before its first dead letter was acknowledged"
        restarted = pipe.start("parse")

        def complete() -> bool:
            pipe.check_alive()
            committed = committed_offsets(admin(settings), settings.group_id("parse"), [(raw, 0)])
            if (
                restarted.counter("pipeline_records_consumed_total") < 60
                or committed[(raw, 0)] != 60
            ):
                return False
            dead = {
                int(header(m, "dlq.original.offset") or -1) for m in dead_letters(settings, "parse")
            }
            return (
                dead == bad_offsets
                and len(read_topic(settings, settings.stages["parse"].output)) >= 54
            )

        wait_for(complete, 60, "every bad record dead-lettered, every good one parsed", pipe.logs)
        outputs = read_topic(settings, settings.stages["parse"].output)
        lineage = {header(m, contract.H_LINEAGE) for m in outputs}
        assert lineage == {b"L%d" % i for i in range(60) if i not in bad_offsets}

        # Redrive of records that keep failing stops at --max-replays.
        args = ["--config", str(config), "dlq", "replay", "--stage", "parse", "--json"]
        env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
        on_dlq = len(dead_letters(settings, "parse"))
        first_replay = run_cli([*args, "--max-replays", "1"], env)
        assert first_replay.exit_code == 0, first_replay.output
        sent = sum(json.loads(first_replay.stdout)["sent"].values())
        assert sent == on_dlq >= 6
        wait_for(
            lambda: len(dead_letters(settings, "parse")) == 2 * sent,
            60,
            "the replayed records dead-lettered again",
            pipe.logs,
        )
        again = [m for m in dead_letters(settings, "parse")[sent:]]
        assert {header(m, "dlq.replay-count") for m in again} == {b"1"}
        second_replay = run_cli([*args, "--max-replays", "1"], env)
        assert second_replay.exit_code == 0, second_replay.output
        report = json.loads(second_replay.stdout)
        assert report["sent"] == report["refused"] == {"decode_error": sent}, report
    finally:
        pipe.stop_all()
