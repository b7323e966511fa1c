"""`pipeline dlq` against the real broker: list, summary, show, export, replay, purge."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dlq.envelope import DeadLetter
from dlq.read import floor_group
from pipeline.kafka.clients import admin, producer
from pipeline.kafka.offsets import committed_offsets, read_topic
from pipeline.settings import Settings
from pipeline.timeparse import parse_instant, to_ms
from tests.integration.harness import isolated_config
from tests.integration.test_topics_cli import run_cli, run_pipeline

T0 = to_ms(parse_instant("2026-03-01T10:00:00Z"))
MIN = 60_000


def iso(ms: int) -> str:
    from dlq.view import iso as to_iso

    out = to_iso(ms)
    assert out is not None
    return out


@dataclass(frozen=True)
class Letter:
    name: str
    stage: str
    reason: str | None  # None: a malformed dead letter (no real envelope)
    failed_at: int
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def key(self) -> bytes:
        return f"key-{self.name}".encode()

    @property
    def value(self) -> bytes:
        return b"\x00\x01\x02" if self.reason is None else f'{{"reading": "{self.name}"}}'.encode()

    @property
    def original_offset(self) -> int:
        return 100 + LETTERS.index(self)

    @property
    def original_ts(self) -> int:
        return T0 - 60 * MIN + LETTERS.index(self) * 1000


LETTERS = [
    Letter("m0", "ingest", None, 0),
    *(
        Letter(f"d{i}", "parse", "decode_error", T0 + i * 10 * MIN, (("lineage-id", b"L"),))
        for i in range(3)
    ),
    *(
        Letter(f"o{i}", "parse", "out_of_range", T0 + (3 + i) * 10 * MIN, (("src", b"s"),))
        for i in range(3)
    ),
    Letter("u0", "enrich", "unknown_device", T0 + 60 * MIN, (("lineage-id", b"U0"),)),
    Letter(
        "u1",
        "enrich",
        "unknown_device",
        T0 + 70 * MIN,
        (("lineage-id", b"U1"), ("dlq.replay-count", b"3")),
    ),
]
BY_NAME = {x.name: x for x in LETTERS}


@dataclass
class Dlqs:
    config: Path
    settings: Settings
    env: dict[str, str]
    refs: dict[str, str]  # letter name → REF

    def run(self, *args: str):
        return run_cli(["--config", str(self.config), "dlq", *args], self.env)

    def json(self, *args: str):
        result = self.run(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def listed(self, *args: str) -> list[str]:
        return [d["ref"] for d in self.json("list", *args)]

    def names(self, *names: str) -> list[str]:
        return [self.refs[n] for n in names]

    def input_records(self, stage: str):
        return read_topic(self.settings, self.settings.stage(stage).inputs[0])


@pytest.fixture
def dlqs(broker, tmp_path) -> Dlqs:
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    client = producer(settings)
    for x in LETTERS:
        if x.reason is None:  # headers a stage never writes: reason unknown, no failed-at
            headers: list[tuple[str, bytes]] = [
                ("dlq.reason", b"Weird Reason!"),
                ("dlq.attempts", b"x"),
            ]
            client.produce(settings.stage(x.stage).dlq, x.value, x.key, headers=headers)
        else:
            dead = DeadLetter(
                stage=x.stage,
                reason=x.reason,
                error_class="InvalidMessage",
                error_message=f"bad record {x.name}",
                key=x.key,
                value=x.value,
                headers=x.headers,
                topic=settings.stage(x.stage).inputs[0],
                partition=LETTERS.index(x) % 4,
                offset=x.original_offset,
                timestamp_ms=x.original_ts,
            )
            client.produce(
                settings.stage(x.stage).dlq,
                x.value,
                x.key,
                headers=dead.envelope_headers(x.failed_at),
                timestamp=x.failed_at,  # as the stages write them: when it failed
            )
    assert client.flush(30) == 0
    refs = {}
    for stage in ("ingest", "parse", "enrich"):
        for msg in read_topic(settings, settings.stage(stage).dlq):
            refs[msg.key().decode().removeprefix("key-")] = (
                f"{stage}:{msg.partition()}:{msg.offset()}"
            )
    assert set(refs) == set(BY_NAME)
    return Dlqs(config, settings, {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}, refs)


def test_list_filters_and_summary(dlqs):
    everything = ["m0", "d0", "d1", "d2", "o0", "o1", "o2", "u0", "u1"]
    assert dlqs.listed() == dlqs.names(*everything)
    assert dlqs.listed("--stage", "parse", "--reason", "out_of_range") == dlqs.names(
        "o0", "o1", "o2"
    )
    assert dlqs.listed(
        "--stage", "parse", "--since", iso(T0 + 10 * MIN), "--until", iso(T0 + 40 * MIN)
    ) == dlqs.names("d1", "d2", "o0")
    assert dlqs.listed(
        "--stage",
        "enrich",
        "--stage",
        "parse",
        "--reason",
        "unknown_device",
        "--reason",
        "decode_error",
        "--limit",
        "4",
    ) == dlqs.names("d0", "d1", "d2", "u0")
    assert dlqs.listed("--reason", "?") == dlqs.names("m0")
    assert dlqs.listed("--stage", "aggregate") == []

    rows = {d["ref"]: d for d in dlqs.json("list")}
    o1 = rows[dlqs.refs["o1"]]
    assert o1["stage"] == "parse" and o1["reason"] == "out_of_range"
    assert o1["error_message"] == "bad record o1"
    assert o1["original_topic"] == dlqs.settings.stage("parse").inputs[0]
    assert o1["original_offset"] == BY_NAME["o1"].original_offset
    assert o1["failed_at"] == iso(T0 + 40 * MIN) == "2026-03-01T10:40:00.000Z"
    assert o1["attempts"] == 1 and o1["replay_count"] == 0
    assert rows[dlqs.refs["u1"]]["replay_count"] == 3
    m0 = rows[dlqs.refs["m0"]]
    assert m0["reason"] == "?" and m0["failed_at"] is None and m0["problems"]

    human = dlqs.run("list", "--stage", "parse")
    assert human.exit_code == 0, human.output
    assert "6 dead letter(s)" in human.stdout
    assert "out_of_range" in human.stdout and "decode_error" in human.stdout

    summary = dlqs.json("summary", "--all")
    assert [(r["stage"], r["reason"], r["count"]) for r in summary] == [
        ("ingest", "?", 1),
        ("parse", "decode_error", 3),
        ("parse", "out_of_range", 3),
        ("enrich", "unknown_device", 2),
    ]
    assert summary[1]["oldest_failed_at"] == iso(T0)
    assert summary[1]["newest_failed_at"] == iso(T0 + 20 * MIN)
    assert summary[3]["max_replay_count"] == 3
    # without --all: those that failed since --since, read from there on
    since = dlqs.json("summary", "--since", iso(T0 + 25 * MIN))
    assert [(r["stage"], r["reason"], r["count"]) for r in since] == [
        ("ingest", "?", 1),  # no failed-at: counted by when it was written (now)
        ("parse", "out_of_range", 3),
        ("enrich", "unknown_device", 2),
    ]
    assert since[1:] == [r for r in summary if r["reason"] in ("out_of_range", "unknown_device")]
    until = dlqs.json("summary", "--since", iso(T0), "--until", iso(T0 + 25 * MIN))
    assert [(r["stage"], r["reason"], r["count"]) for r in until] == [("parse", "decode_error", 3)]
    # by default the last 24 hours; how many each stage holds in all beside it
    human = dlqs.run("summary")
    assert human.exit_code == 0, human.output
    assert "1 dead letter(s) that failed since" in human.stdout
    assert "held in all: ingest 1, parse 6, enrich 2, aggregate 0" in human.stdout
    human = dlqs.run("summary", "--stage", "enrich", "--all")
    assert human.exit_code == 0 and "unknown_device" in human.stdout


def test_show_and_export(dlqs, tmp_path):
    shown = dlqs.json("show", dlqs.refs["o1"])
    assert shown["ref"] == dlqs.refs["o1"]
    assert shown["reason"] == "out_of_range"
    assert shown["key_text"] == "key-o1"
    assert shown["value_preview"] == {
        "encoding": "text",
        "text": '{"reading": "o1"}',
        "size": 17,
        "truncated": False,
    }
    names = [h["name"] for h in shown["headers"]]
    assert names[0] == "src"
    assert {"dlq.stage", "dlq.reason", "dlq.failed-at", "dlq.replay-count"} <= set(names)

    human = dlqs.run("show", dlqs.refs["m0"])
    assert human.exit_code == 0, human.output
    assert "reason:        ?" in human.stdout
    assert "problems:" in human.stdout and "dlq.failed-at missing" in human.stdout
    assert "payload (3 bytes, hex):\n00 01 02" in human.stdout

    out = tmp_path / "parse.parquet"
    result = dlqs.run("export", "--out", str(out), "--stage", "parse", "--reason", "decode_error")
    assert result.exit_code == 0, result.output
    assert "wrote 3 dead letter(s)" in result.stdout
    rows = pq.read_table(out).to_pylist()
    assert [r["ref"] for r in rows] == dlqs.names("d0", "d1", "d2")
    assert [r["key"] for r in rows] == [BY_NAME[n].key for n in ("d0", "d1", "d2")]
    assert rows[0]["value"] == BY_NAME["d0"].value
    assert rows[2]["error_message"] == "bad record d2"
    assert {"name": "lineage-id", "value": b"L"} in rows[0]["headers"]

    lines = tmp_path / "all.jsonl"
    assert dlqs.json("export", "--out", str(lines))["written"] == 9
    exported = [json.loads(x) for x in lines.read_text().splitlines()]
    assert [x["ref"] for x in exported] == list(dlqs.refs.values())


def test_replay_dry_run_then_replay(dlqs):
    dry = dlqs.json("replay", "--stage", "parse", "--reason", "out_of_range", "--dry-run")
    assert dry["dry_run"] is True
    assert dry["sent"] == {"out_of_range": 3} and dry["refused"] == {}
    assert dry["sent_refs"] == dlqs.names("o0", "o1", "o2")
    human = dlqs.run("replay", "--stage", "enrich", "--dry-run")
    assert human.exit_code == 0, human.output
    assert "dry run, nothing was sent" in human.stdout
    assert dlqs.input_records("parse") == []
    assert dlqs.input_records("enrich") == []

    report = dlqs.json("replay", "--stage", "enrich")
    assert report["sent"] == {"unknown_device": 1}
    assert report["refused"] == {"unknown_device": 1}
    assert report["refused_refs"] == dlqs.names("u1")
    [record] = dlqs.input_records("enrich")
    u0 = BY_NAME["u0"]
    assert (record.key(), record.value()) == (u0.key, u0.value)
    assert record.timestamp()[1] == u0.original_ts
    assert record.headers() == [("lineage-id", b"U0"), ("dlq.replay-count", b"1")]

    started = time.monotonic()
    report = dlqs.json("replay", "--stage", "parse", "--reason", "out_of_range", "--rate", "5")
    assert time.monotonic() - started >= 0.39  # 3 records at 5/s: two gaps of 0.2 s
    assert report["sent"] == {"out_of_range": 3} and report["refused"] == {}
    records = dlqs.input_records("parse")
    got = sorted((r.key(), r.value(), r.timestamp()[1], r.headers()) for r in records)
    assert got == sorted(
        (x.key, x.value, x.original_ts, [("src", b"s"), ("dlq.replay-count", b"1")])
        for x in (BY_NAME["o0"], BY_NAME["o1"], BY_NAME["o2"])
    )
    # the dead letters stay where they were
    assert len(dlqs.listed()) == 9

    # at --max-replays 1 a once-replayed record would be refused; these are at 0
    again = dlqs.json("replay", "--stage", "enrich", "--max-replays", "1", "--dry-run")
    assert again["sent_refs"] == dlqs.names("u0") and again["refused_refs"] == dlqs.names("u1")


def test_purge_hides_dead_letters_below_the_floor(dlqs, tmp_path):
    before = iso(T0 + 25 * MIN)
    dry = dlqs.run("purge", "--stage", "parse", "--before", before)
    assert dry.exit_code == 0, dry.output
    assert "dry run, nothing was changed: 3 dead letter(s)" in dry.stdout
    assert "add --yes" in dry.stdout
    assert len(dlqs.listed("--stage", "parse")) == 6
    assert dlqs.json("purge", "--stage", "parse", "--before", before)["purged"] == 3
    group, dlq_topic = floor_group(dlqs.settings), dlqs.settings.stage("parse").dlq
    assert committed_offsets(admin(dlqs.settings), group, [(dlq_topic, 0)]) == {
        (dlq_topic, 0): None
    }

    done = dlqs.json("purge", "--stage", "parse", "--before", before, "--yes")
    assert done["dry_run"] is False and done["purged"] == 3
    assert done["by_reason"] == {"decode_error": 3}
    o0_offset = int(dlqs.refs["o0"].rsplit(":", 1)[1])
    assert done["partitions"][0]["new_floor"] == o0_offset
    assert dlqs.listed("--stage", "parse") == dlqs.names("o0", "o1", "o2")
    summary = dlqs.json("summary", "--stage", "parse", "--all")
    assert [(r["reason"], r["count"]) for r in summary] == [("out_of_range", 3)]
    window = dlqs.json("summary", "--stage", "parse", "--since", iso(T0 - 60 * MIN))
    assert window == summary  # the purged ones are below the floor there too
    gone = dlqs.run("show", dlqs.refs["d1"])
    assert gone.exit_code == 1
    assert gone.stderr.strip().startswith(f"error: dead letter {dlqs.refs['d1']} was purged")
    assert dlqs.json("show", dlqs.refs["o0"])["ref"] == dlqs.refs["o0"]

    # never backwards: an earlier --before purges nothing and leaves the floor
    earlier = dlqs.json("purge", "--stage", "parse", "--before", iso(T0), "--yes")
    assert earlier["purged"] == 0
    assert committed_offsets(admin(dlqs.settings), group, [(dlq_topic, 0)]) == {
        (dlq_topic, 0): o0_offset
    }
    human = dlqs.run("purge", "--stage", "parse", "--before", iso(T0 + 45 * MIN), "--yes")
    assert human.exit_code == 0, human.output
    assert "purged 2 dead letter(s) of stage parse" in human.stdout
    assert "retention.ms" in human.stdout
    assert dlqs.listed("--stage", "parse") == dlqs.names("o2")

    # replay and export see only what is above the floor; other stages are untouched
    replay = dlqs.json("replay", "--stage", "parse", "--dry-run")
    assert replay["sent_refs"] == dlqs.names("o2")
    assert dlqs.json("export", "--out", str(tmp_path / "rest.jsonl"))["written"] == 4

    # a dead letter that cannot be dated stops the floor instead of being hidden
    blocked = dlqs.json("purge", "--stage", "ingest", "--before", "2100-01-01T00:00:00Z")
    assert blocked["purged"] == 0
    assert blocked["partitions"][0]["blocked_by"] == dlqs.refs["m0"]


def test_cli_subprocess_exit_codes(dlqs):
    env = {**os.environ, **dlqs.env}
    proc = run_pipeline(
        ["--config", str(dlqs.config), "dlq", "show", "parse:0:999999"], env, timeout=90
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: dead letter parse:0:999999 not found")
    proc = run_pipeline(
        ["--config", str(dlqs.config), "dlq", "list", "--stage", "enrich", "--json"],
        env,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    assert [d["ref"] for d in json.loads(proc.stdout)] == dlqs.names("u0", "u1")
