from pathlib import Path

import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.settings import STAGE_IDS, load_settings

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, mutate) -> Path:
    doc = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    mutate(doc)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_shipped_config_is_valid_and_complete():
    s = load_settings(REPO / "config" / "pipeline.yaml")
    assert set(s.stages) == set(STAGE_IDS)
    assert s.stage("parse").inputs == ("iot.raw",)
    assert s.topics["iot.devices"].compacted
    assert s.group_id("parse") == "iot-pipeline-parse"


def test_environment_overrides_yaml(monkeypatch):
    monkeypatch.setenv("PIPELINE_AGGREGATE__WINDOW_S", "30")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    s = load_settings(REPO / "config" / "pipeline.yaml")
    assert s.aggregate.window_s == 30
    assert s.aggregate.allowed_lateness_s == 10  # untouched nested value kept
    assert s.kafka_bootstrap_servers == "broker:9092"


def test_settings_are_frozen():
    s = load_settings(REPO / "config" / "pipeline.yaml")
    with pytest.raises(Exception, match="frozen"):
        s.app_prefix = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["topics"]["iot.raw"].update(partitions=0), "topics.iot.raw.partitions"),
        (lambda d: d["stages"]["parse"].update(output="nope"), "not declared"),
        (
            lambda d: d["stages"].update(
                transform={"inputs": ["iot.raw"], "output": "iot.raw", "dlq": "iot.raw"}
            ),
            "unknown stage",
        ),
        (lambda d: d["aggregate"].update(window_s="soon"), "aggregate.window_s"),
        (
            lambda d: d["parse"]["ranges"].update(humidity={"min": 10, "max": 0}),
            "min 10.0 > max 0.0",
        ),
        (lambda d: d["topics"]["iot.aggregate.state"].update(partitions=2), "one partition count"),
    ],
)
def test_invalid_config_is_one_clear_line(tmp_path, mutate, message):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, mutate))
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("topics: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_unknown_stage_lookup_names_the_known_ones():
    s = load_settings(REPO / "config" / "pipeline.yaml")
    with pytest.raises(ConfigError, match="ingest, parse, enrich, aggregate"):
        s.stage("transform")
