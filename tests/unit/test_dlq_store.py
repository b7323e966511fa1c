"""dlq.store without a broker: envelope parsing, REFs, filters, export, CLI validation."""

from __future__ import annotations

import base64
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dlq import export, read, redrive, view
from dlq.envelope import DeadLetter
from pipeline.cli.main import cli
from pipeline.errors import ConfigError
from pipeline.timeparse import parse_instant, to_ms

T0 = to_ms(parse_instant("2026-03-01T10:00:00Z"))
MIN = 60_000
NO_BROKER = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}


def letter(
    reason: str = "decode_error",
    failed_at: int = T0,
    offset: int = 0,
    stage: str = "parse",
    headers: tuple[tuple[str, bytes], ...] = (("lineage-id", b"L1"),),
    key: bytes | None = b"dev-1",
    value: bytes | None = b"not json",
) -> read.StoredDeadLetter:
    dead = DeadLetter(
        stage=stage,
        reason=reason,
        error_class="InvalidMessage",
        error_message="payload is not JSON",
        key=key,
        value=value,
        headers=headers,
        topic="iot.raw",
        partition=2,
        offset=40 + offset,
        timestamp_ms=T0 - 5 * MIN,
        attempts=1,
    )
    return read.parse_dead_letter(
        stage,
        f"iot.{stage}.dlq",
        0,
        offset,
        key,
        value,
        dead.envelope_headers(failed_at),
        T0 - 5 * MIN,
    )


# --------------------------------------------------------------------- parsing


def test_envelope_headers_parse_into_the_dataclass():
    d = letter(headers=(("lineage-id", b"L1"), ("dlq.replay-count", b"2")))
    assert d.ref == "parse:0:0"
    assert (d.stage, d.reason, d.error_class) == ("parse", "decode_error", "InvalidMessage")
    assert d.error_message == "payload is not JSON"
    assert (d.original_topic, d.original_partition, d.original_offset) == ("iot.raw", 2, 40)
    assert d.original_timestamp_ms == T0 - 5 * MIN
    assert d.failed_at_ms == T0
    assert d.attempts == 1
    assert d.replay_count == 2
    assert d.key == b"dev-1" and d.value == b"not json"
    assert d.problems == () and not d.malformed
    assert d.original_headers() == [("lineage-id", b"L1")]


def test_malformed_envelope_is_parsed_with_reason_unknown_and_problems():
    d = read.parse_dead_letter(
        "enrich",
        "iot.enrich.dlq",
        0,
        7,
        None,
        b"\x00\x01",
        [
            ("dlq.reason", b"no such"),
            ("dlq.failed-at", b"yesterday"),
            ("dlq.attempts", b"-1"),
            ("trace", None),
        ],
        None,
    )
    assert d.ref == "enrich:0:7"
    assert d.reason == read.UNKNOWN_REASON == "?"
    assert d.failed_at_ms is None and d.attempts is None and d.original_topic is None
    assert d.replay_count == 0
    assert d.malformed
    joined = "; ".join(d.problems)
    for expected in (
        "dlq.reason 'no such' is not a reason code",
        "dlq.failed-at 'yesterday' is not an integer",
        "dlq.attempts -1 is negative",
        "dlq.stage missing",
        "dlq.original.topic missing",
    ):
        assert expected in joined
    assert d.headers[-1] == ("trace", None)
    # no headers at all: still a dead letter, never an exception
    bare = read.parse_dead_letter("parse", "t", 0, 1, None, None, None)
    assert bare.reason == "?" and bare.headers == () and bare.timestamp_ms is None


def test_replay_headers_drop_the_envelope_and_count_one_more():
    d = letter(
        headers=(("lineage-id", b"L1"), ("retry.attempts", b"2"), ("dlq.replay-count", b"1"))
    )
    assert redrive.replay_headers(d) == [("lineage-id", b"L1"), ("dlq.replay-count", b"2")]
    assert redrive.replay_timestamp(d) == T0 - 5 * MIN
    bare = read.parse_dead_letter("parse", "t", 0, 1, None, None, (), 1234)
    assert redrive.replay_timestamp(bare) == 1234
    assert redrive.replay_headers(bare) == [("dlq.replay-count", b"1")]


# ------------------------------------------------------------------------ refs


STAGES = ("ingest", "parse", "enrich", "aggregate")


def test_parse_ref():
    assert read.parse_ref("parse:0:17", STAGES) == read.Ref("parse", 0, 17)
    assert str(read.parse_ref(" enrich:3:0 ", STAGES)) == "enrich:3:0"
    assert read.parse_ref("my-alert-2:1:5", ("my-alert-2",)).stage == "my-alert-2"
    for bad in ("parse:0", "parse:-1:2", "parse:a:2", "parse:0:1:2", "", "nope:0:1"):
        with pytest.raises(ConfigError, match="bad dead-letter reference"):
            read.parse_ref(bad, STAGES)


# --------------------------------------------------------------------- filters


def test_filters_by_reason_time_and_limit():
    letters = [
        letter("decode_error", T0, 0),
        letter("out_of_range", T0 + 10 * MIN, 1),
        letter("out_of_range", T0 + 20 * MIN, 2),
        read.parse_dead_letter("parse", "t", 0, 3, None, None, ()),  # no failed-at
    ]

    def refs(f: read.Filters) -> list[str]:
        return [d.ref for d in f.apply(letters)]

    assert refs(read.Filters()) == ["parse:0:0", "parse:0:1", "parse:0:2", "parse:0:3"]
    assert refs(read.make_filters(["out_of_range"])) == ["parse:0:1", "parse:0:2"]
    assert refs(read.make_filters(["?"])) == ["parse:0:3"]
    since_until = read.make_filters(since="2026-03-01T10:10:00Z", until="2026-03-01T11:20:00+01:00")
    assert refs(since_until) == ["parse:0:1"]  # since inclusive, until exclusive
    assert refs(read.make_filters(limit=2)) == ["parse:0:0", "parse:0:1"]
    assert refs(read.make_filters(["out_of_range", "decode_error"], limit=1)) == ["parse:0:0"]


def test_filter_validation():
    with pytest.raises(ConfigError, match="unknown reason 'bogus'; choose from: late, too_large"):
        read.make_filters(["bogus"], known=["late", "too_large"])
    assert read.make_filters(["any_code"]).reasons == {"any_code"}  # stages' code not known
    with pytest.raises(ConfigError, match="unknown reason 'Not A Code'"):
        read.make_filters(["Not A Code"])
    with pytest.raises(ConfigError, match="has no timezone"):
        read.make_filters(since="2026-03-01T10:00:00")
    with pytest.raises(ConfigError, match="is not before"):
        read.make_filters(since="2026-03-01T10:00:00Z", until="2026-03-01T10:00:00Z")
    assert read.parse_stages([], STAGES) == STAGES
    assert read.parse_stages(["enrich", "parse", "enrich"], STAGES) == ("parse", "enrich")
    with pytest.raises(ConfigError, match="unknown stage 'transform'"):
        read.parse_stages(["transform"], STAGES)


def test_summarize_counts_by_stage_and_reason():
    rows = view.summarize(
        [
            letter("out_of_range", T0 + 5 * MIN, 0),
            letter("decode_error", T0 + 3 * MIN, 1),
            letter("out_of_range", T0 + 1 * MIN, 2),
            letter("unknown_device", T0, 0, stage="enrich"),
            read.parse_dead_letter("parse", "t", 0, 3, None, None, ()),
        ],
        STAGES,
    )
    assert [(r.stage, r.reason, r.count) for r in rows] == [
        ("parse", "decode_error", 1),
        ("parse", "out_of_range", 2),
        ("parse", "?", 1),
        ("enrich", "unknown_device", 1),
    ]
    out_of_range = rows[1]
    assert out_of_range.oldest_failed_at_ms == T0 + MIN
    assert out_of_range.newest_failed_at_ms == T0 + 5 * MIN
    assert rows[2].oldest_failed_at_ms is None


def test_preview_text_or_hex():
    assert view.preview(b'{"a": 1}') == view.Preview("text", '{"a": 1}', 8, False)
    assert view.preview(b"\x00\x01\xff").encoding == "hex"
    assert view.preview(b"\x00\x01\xff").text == "00 01 ff"
    assert view.preview(b"\x1b[31mred").encoding == "hex"  # no terminal escapes as text
    long = ("é" * 400).encode()  # 800 bytes: the cut at 512 falls between characters
    p = view.preview(long)
    assert p.encoding == "text" and p.truncated and p.size == 800 and p.text == "é" * 256
    odd = b"a" + "é".encode() * 300  # the cut at 512 splits a character
    q = view.preview(odd)
    assert q.encoding == "text" and q.text == "a" + "é" * 255
    assert view.preview(None).encoding == "none"


# ---------------------------------------------------------------------- export


def test_export_parquet_and_jsonl_read_back(tmp_path):
    letters = [
        letter("decode_error", T0, 0, value=b"\xff\xfe binary"),
        letter("out_of_range", T0 + MIN, 1, key=None),
        read.parse_dead_letter("parse", "t", 0, 2, b"k", b"v", [("x", None)]),
    ]
    assert export.export(letters, tmp_path / "out.parquet") == 3
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.equals(export.parquet_schema())
    rows = table.to_pylist()
    assert [r["ref"] for r in rows] == ["parse:0:0", "parse:0:1", "parse:0:2"]
    assert rows[0]["value"] == b"\xff\xfe binary" and rows[0]["key"] == b"dev-1"
    assert rows[1]["key"] is None
    assert rows[0]["reason"] == "decode_error" and rows[2]["reason"] == "?"
    assert rows[0]["original_offset"] == 40 and rows[0]["original_partition"] == 2
    assert int(rows[1]["failed_at"].timestamp() * 1000) == T0 + MIN
    assert rows[2]["failed_at"] is None
    assert {"name": "lineage-id", "value": b"L1"} in rows[0]["headers"]
    assert {"name": "dlq.reason", "value": b"decode_error"} in rows[0]["headers"]
    assert rows[2]["headers"] == [{"name": "x", "value": None}]

    assert export.export(letters, tmp_path / "out.jsonl") == 3
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["ref"] for x in lines] == ["parse:0:0", "parse:0:1", "parse:0:2"]
    assert base64.b64decode(lines[0]["value_b64"]) == b"\xff\xfe binary"
    assert lines[0]["value_text"] is None  # not UTF-8
    assert lines[0]["key_text"] == "dev-1"
    assert lines[1]["key_b64"] is None
    assert lines[0]["failed_at"] == "2026-03-01T10:00:00.000Z"
    assert {"name": "lineage-id", "value_b64": "TDE=", "value_text": "L1"} in lines[0]["headers"]
    # nothing half-written is left beside the files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.parquet"]


def test_export_empty_and_bad_extension(tmp_path):
    assert export.export([], tmp_path / "none.parquet") == 0
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
    with pytest.raises(ConfigError, match=r"must end in \.parquet or \.jsonl"):
        export.export([], tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_pacer_spaces_calls():
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    pacer = redrive.Pacer(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        pacer.wait()
    assert slept == [0.25, 0.25, 0.25, 0.25]
    unlimited = redrive.Pacer(None, clock=lambda: now[0], sleep=sleep)
    unlimited.wait()
    assert len(slept) == 4


# ------------------------------------------------------------ CLI validation


def run(args: list[str]):
    return CliRunner().invoke(cli, ["dlq", *args], env=NO_BROKER, catch_exceptions=False)


def one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["list", "--reason", "bogus"],
            "unknown reason 'bogus'; choose from: processing_error, unwritable, late, "
            "decode_error, state_unreadable, empty, too_large",
        ),
        (["list", "--stage", "transform"], "unknown stage 'transform'"),
        (
            ["list", "--since", "2026-03-01T10:00:00"],
            "--since '2026-03-01T10:00:00' has no timezone",
        ),
        (["summary", "--until", "yesterday"], "--until 'yesterday' is not an ISO 8601"),
        (["show", "parse-0-17"], "bad dead-letter reference 'parse-0-17'"),
        (["show", "parser:0:17"], "unknown stage 'parser'"),
        (["export", "--out", "dead.csv"], "must end in .parquet or .jsonl"),
        (["export", "--out", "d.parquet", "--reason", "x"], "unknown reason 'x'"),
        (["replay", "--stage", "parse", "--since", "2026-03-01"], "has no timezone"),
        (["replay", "--stage", "parse", "--reason", "late_ish"], "unknown reason 'late_ish'"),
        (["purge", "--stage", "parse", "--before", "2026-03-01T10:00"], "has no timezone"),
        (["purge", "--stage", "nope", "--before", "2026-03-01T10:00Z"], "unknown stage 'nope'"),
    ],
)
def test_cli_validation_fails_fast_with_exit_2(args, expected, tmp_path):
    # the broker at 127.0.0.1:1 is unreachable: reaching it would exit 3, not 2
    result = run(args)
    assert result.exit_code == 2, result.output
    assert expected in one_error_line(result)
    assert not (tmp_path / "d.parquet").exists()


def test_cli_naive_since_mentions_timezone():
    result = run(["list", "--since", "2026-03-01 10:00"])
    assert result.exit_code == 2
    assert "timezone" in one_error_line(result)
    assert result.stdout == ""


def test_human_tables_print_dead_letter_text_literally(capsys):
    from pipeline.cli.common import print_table

    print_table(["REF", "error"], [["parse:0:1", "[/bold] \x1b[31mred\nline"], ["parse:0:2", None]])
    out = capsys.readouterr().out
    assert "[/bold] \\x1b[31mred\\nline" in out  # not rich markup, no raw escapes
    assert "\x1b" not in out
    assert "parse:0:2  -" in out
