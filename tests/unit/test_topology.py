"""The graph is derived from what stages declare: order, fan-in, fan-out, sinks,
several pipelines in one file, backfill-lane routing, and the checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.errors import ConfigError
from pipeline.settings import load_settings

REPO = Path(__file__).resolve().parents[2]

DOC = {
    "topics": {
        t: {"partitions": 2, **({"external": True} if t in ("a.in", "b.in") else {})}
        for t in ("a.in", "a.x", "a.y", "a.joined", "a.dlq", "b.in", "b.out", "b.dlq", "a.lx")
    },
    "stages": {
        # declared out of order on purpose: the order comes from the graph
        "join": {"uses": "m:s", "inputs": ["a.x", "a.y"], "output": "a.joined", "dlq": "a.dlq"},
        "split": {
            "uses": "m:s",
            "inputs": ["a.in"],
            "output": "a.x",
            "outputs": ["a.y"],
            "dlq": "a.dlq",
        },
        "sink": {"uses": "m:s", "inputs": ["a.joined"], "dlq": "a.dlq"},
        "other": {"uses": "m:s", "inputs": ["b.in"], "output": "b.out", "dlq": "b.dlq"},
    },
}


def load(tmp_path: Path, doc: dict) -> object:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_settings(path)


def test_order_fan_out_fan_in_sinks_and_separate_pipelines(tmp_path):
    s = load(tmp_path, DOC)
    graph = s.topology
    assert s.stage_ids == ("split", "join", "sink", "other")
    assert graph.outputs["split"] == ("a.x", "a.y")  # fan-out
    assert graph.next_stages("split") == ("join",)
    assert graph.upstream("sink") == ("split", "join", "sink")  # fan-in, transitively
    assert graph.downstream("split") == ("split", "join", "sink")
    assert graph.sinks() == ("sink",)
    assert graph.entry_stages() == ("split", "other")
    assert graph.final_topics() == ("b.out",)
    assert graph.components() == [("split", "join", "sink"), ("other",)]
    assert graph.problems(s.stages, s.topics) == []


def test_lane_outputs_go_to_the_readers_lanes(tmp_path):
    doc = yaml.safe_load(yaml.safe_dump(DOC))
    doc["stages"]["join"]["backfill_lane"] = "a.lx"
    s = load(tmp_path, doc)
    assert s.topology.lane_targets("split") == {"a.x": ("a.lx",), "a.y": ("a.lx",)}
    assert s.topology.lane_targets("join") == {"a.joined": ("a.joined",)}  # sink: no lane


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["stages"]["split"].update(inputs=["a.joined"]), "form a cycle"),
        (
            lambda d: d["stages"].update(
                tap={"uses": "m:s", "inputs": ["a.x"], "dlq": "a.dlq", "backfill_lane": "a.lx"}
            ),
            "give every reader of it a backfill_lane, or none",
        ),
    ],
)
def test_refused_when_loaded(tmp_path, change, message):
    doc = yaml.safe_load(yaml.safe_dump(DOC))
    change(doc)
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, doc)


def test_problems_an_input_nobody_writes_and_stateful_partitions(tmp_path):
    doc = yaml.safe_load(yaml.safe_dump(DOC))
    doc["topics"]["a.in"]["external"] = False
    doc["topics"]["state"] = {"partitions": 3, "compacted": True}
    doc["stages"]["join"]["state_topic"] = "state"
    s = load(tmp_path, doc)
    problems = s.topology.problems(s.stages, s.topics)
    assert any("stage split reads a.in, which no stage writes" in p for p in problems)
    assert any("stateful stage join" in p and "one partition count" in p for p in problems)


def test_pipeline_topology_prints_the_graph_and_exits_1_on_problems(tmp_path):
    runner = CliRunner()
    shipped = REPO / "config" / "pipeline.yaml"
    result = runner.invoke(cli, ["--config", str(shipped), "topology", "--check"])
    assert result.exit_code == 0, result.output
    assert "iot.enriched -> [aggregate] -> iot.aggregates" in result.stdout
    mermaid = runner.invoke(cli, ["--config", str(shipped), "topology", "--format", "mermaid"])
    assert mermaid.stdout.startswith("flowchart LR") and "s_aggregate --> t_iot_aggregates" in (
        mermaid.stdout
    )
    doc = json.loads(
        runner.invoke(cli, ["--config", str(shipped), "topology", "--format", "json"]).stdout
    )
    assert doc["order"] == ["ingest", "parse", "enrich", "aggregate"]
    assert doc["stages"]["parse"]["feeds"] == ["enrich"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(DOC, sort_keys=False))  # uses: m:s cannot be imported
    result = runner.invoke(cli, ["--config", str(bad), "topology", "--check"])
    assert result.exit_code == 1
    assert (
        "4 problem(s)" in result.stderr and "stages.split.uses: cannot import 'm'" in result.stderr
    )
    assert "problem: stages.join.uses: cannot import 'm'" in result.stdout
