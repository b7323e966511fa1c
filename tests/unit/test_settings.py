from pathlib import Path

import pytest
import yaml

from pipeline.engine.build import load_stage
from pipeline.errors import ConfigError
from pipeline.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, mutate) -> Path:
    doc = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    mutate(doc)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_shipped_config_is_valid_and_complete():
    s = load_settings(REPO / "config" / "pipeline.yaml")
    assert s.stage_ids == ("ingest", "parse", "enrich", "aggregate")  # from the graph
    assert s.stage("parse").inputs == ("iot.raw",)
    assert s.topics["iot.devices"].compacted
    assert s.group_id("parse") == "iot-pipeline-parse"


def test_environment_overrides_yaml(monkeypatch):
    monkeypatch.setenv("PIPELINE_STAGES__AGGREGATE__CONFIG__WINDOW_S", "30")
    monkeypatch.setenv("PIPELINE_STAGES__AGGREGATE__IDLE_TIMEOUT_S", "2")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    s = load_settings(REPO / "config" / "pipeline.yaml")
    config = load_stage(s, "aggregate").make_config("aggregate", s.stages["aggregate"].config)
    assert config.window_s == 30
    assert config.allowed_lateness_s == 10  # untouched nested value kept
    assert s.stages["aggregate"].idle_timeout_s == 2
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
            "stages.transform.uses",
        ),
        (
            lambda d: d["stages"].update(
                my_stage={"uses": "m:s", "inputs": ["iot.raw"], "dlq": "iot.raw"}
            ),
            "stage id 'my_stage'",
        ),
        (
            lambda d: d["stages"]["ingest"].update(inputs=["iot.aggregates"]),
            "form a cycle",
        ),
        (lambda d: d["stages"]["parse"].update(inputs=["iot.parsed"]), "a topic it writes"),
        (lambda d: d.update(aggregate={"window_s": 30}), "moved"),
        (
            lambda d: d["stages"]["enrich"].update(lookups={"devices": "iot.nope"}),
            "iot.nope",
        ),
    ],
)
def test_invalid_config_is_one_clear_line(tmp_path, mutate, message):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, mutate))
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("stage", "mutate", "message"),
    [
        (
            "aggregate",
            lambda d: d["stages"]["aggregate"]["config"].update(window_s="soon"),
            "stages.aggregate.config.window_s",
        ),
        (
            "parse",
            lambda d: d["stages"]["parse"]["config"]["ranges"].update(
                humidity={"min": 10, "max": 0}
            ),
            "min 10.0 > max 0.0",
        ),
        (
            "aggregate",
            lambda d: d["topics"]["iot.aggregate.state"].update(partitions=2),
            "one partition count",
        ),
        ("aggregate", lambda d: d["stages"]["aggregate"].pop("state_topic"), "is stateful"),
        (
            "parse",
            lambda d: d["stages"]["parse"].update(state_topic="iot.aggregate.state"),
            "keeps no state",
        ),
        ("parse", lambda d: d["stages"]["parse"].update(uses="stages.parse:nope"), "no attribute"),
        ("parse", lambda d: d["stages"]["parse"].update(uses="nope.mod:x"), "cannot import"),
        (
            "parse",
            lambda d: d["stages"]["parse"].update(uses="stages.parse:Validator"),
            "not a stage",
        ),
    ],
)
def test_a_stage_whose_code_and_declaration_disagree_is_refused_at_start(
    tmp_path, stage, mutate, message
):
    settings = load_settings(write(tmp_path, mutate))
    with pytest.raises(ConfigError) as info:
        load_stage(settings, stage)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


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
