"""The README's "Write your own stage", followed from an empty folder: a user's
package with the issue's `alert` stage and a pipeline.yaml naming it with `uses:`,
run by `pipeline.testing.TopologyCluster` as a real worker on the real broker."""

from __future__ import annotations

import textwrap

import orjson

from pipeline.testing import TopologyCluster

ALERTS = '''\
from collections.abc import Iterator

from pipeline import Emit, InvalidMessage, Record, StageContext, stage


@stage(reasons={"no_mean": "a window without a mean"})
def alert(record: Record, ctx: StageContext) -> Iterator[Emit]:
    """One aggregate window in; zero or one alert out."""
    window = record.json()
    if "mean" not in window:
        raise InvalidMessage("no_mean", "window has no mean")
    if window["mean"] > ctx.config["threshold"]:
        yield Emit(key=record.key, value=record.value, schema="alert/1")
'''

PIPELINE_YAML = """\
app_prefix: mine
lineage_topic: lineage
paths: [.]
topics:
  windows:   {partitions: 2, external: true}
  alerts:    {partitions: 1}
  alert.dlq: {partitions: 1}
  lineage:   {partitions: 1}
stages:
  alert:
    uses: mypkg.alerts:alert
    inputs: [windows]
    output: alerts
    dlq: alert.dlq
    on_error: dead_letter
    config: {threshold: 30}
"""


def test_a_stage_written_outside_the_project_runs_as_its_own_worker(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "alerts.py").write_text(textwrap.dedent(ALERTS))
    (tmp_path / "pipeline.yaml").write_text(PIPELINE_YAML)

    with TopologyCluster(tmp_path / "pipeline.yaml", tmp_path / "run") as cluster:
        cluster.produce("windows", [{"mean": 31.5}, {"mean": 12.0}, {"count": 4}], key="dev-1")
        (alert,) = cluster.wait_for_records("alerts", 1)
        assert orjson.loads(alert.value or b"") == {"mean": 31.5}
        assert alert.headers["schema"] == b"alert/1" and alert.headers["lineage-id"]
        (letter,) = cluster.dead_letters("alert") or cluster.wait_for_records("alert.dlq", 1)
        assert letter.headers["dlq.reason"] == b"no_mean"
        assert letter.headers["dlq.stage"] == b"alert"
        assert orjson.loads(letter.value or b"") == {"count": 4}

        def counted() -> bool:
            text = cluster.metrics_text("alert")
            return 'pipeline_records_consumed_total{stage="alert"' in text and (
                'pipeline_dlq_records_total{reason="no_mean",stage="alert"} 1.0' in text
            )

        cluster.wait_for(counted, 30, "the alert stage's metrics")
        hops = cluster.wait_for_records("lineage", 1)
        outcomes = sorted(
            g["outcome"] for h in hops for g in orjson.loads(h.value or b"{}")["groups"]
        )
        assert outcomes == ["dead_letter", "dropped", "passed"]  # ids derived at entry
