"""Sink settings: secrets never in pipeline.yaml, the dsn without a password, the
column model checked, and rows typed (no database needed for these)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.engine.build import load_stage
from pipeline.errors import ConfigError, InvalidMessage
from pipeline.records import Record
from pipeline.settings import load_settings
from pipeline.sinks import PostgresConfig
from pipeline.sinks.rows import RowModel, Rows

REPO = Path(__file__).resolve().parents[2]


def with_store(tmp_path: Path, config: dict) -> Path:
    doc = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    doc["topics"]["iot.store.dlq"] = {"partitions": 1}
    doc["stages"]["store"] = {
        "uses": "pipeline.sinks:postgres",
        "inputs": ["iot.aggregates"],
        "dlq": "iot.store.dlq",
        "config": config,
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_password_in_the_file_is_refused_with_where_to_put_it(tmp_path):
    path = with_store(tmp_path, {"dsn": "postgresql://u@db/iot", "password": "hunter2"})
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "PIPELINE_STAGES__STORE__CONFIG__PASSWORD" in message and "hunter2" not in message


def test_the_password_comes_from_the_environment(tmp_path, monkeypatch):
    path = with_store(tmp_path, {"dsn": "postgresql://u@db/iot"})
    monkeypatch.setenv("PIPELINE_STAGES__STORE__CONFIG__PASSWORD", "hunter2")
    settings = load_settings(path)
    load_stage(settings, "store")  # the sink's model accepts it
    config = PostgresConfig(**settings.stages["store"].config)
    assert config.password is not None and config.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://u:hunter2@db/iot", "host=db user=u password=hunter2", "postgres://u:@db/x"],
)
def test_a_dsn_with_a_password_is_refused(dsn):
    with pytest.raises(ValueError, match="holds a password"):
        PostgresConfig(dsn=dsn)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"dsn": "x", "table": "a;drop table b"}, "schema"),
        ({"dsn": "x", "key": ["nope"]}, "not among the columns"),
        ({"dsn": "x", "columns": {"a b": "text"}, "key": ["a b"]}, "column name"),
        ({"dsn": "x", "columns": {"a": "uuid"}, "key": ["a"]}, "Input should be"),
    ],
)
def test_bad_sink_settings_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        PostgresConfig(**config)


def test_rows_are_typed_and_keys_required():
    rows = Rows(RowModel(key=("id",), columns={"id": "text", "n": "bigint", "at": "timestamp"}))
    record = Record("t", 0, 0, 0, None, b'{"id": "a", "n": 3, "at": 1767225600000}', ())
    row = rows.row(record)
    assert row[0] == "a" and row[1] == 3 and row[2].year == 2026
    for bad in (b'{"n": 3}', b'{"id": "a", "n": "3"}', b'{"id": "a", "n": 1.5}', b"[1]"):
        with pytest.raises(InvalidMessage) as caught:
            rows.row(Record("t", 0, 0, 0, None, bad, ()))
        assert caught.value.reason in ("schema_violation", "decode_error")
