"""A bug in a user's stage code, on a real broker with a real worker (issue 14): with
``on_error: dead_letter`` the record that hits it is a ``processing_error`` dead
letter and the rest flow; a bug on every other record trips the dead-letter budget;
with ``on_error: crash`` the worker exits 70, and a worker that fails on the same
batch again says so in its metrics, /healthz and ``pipeline status``."""

from __future__ import annotations

import json
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.testing import TopologyCluster

DIVIDE = '''\
import time

from pipeline import Emit, Record, StageContext, stage


@stage
def divide(record: Record, ctx: StageContext) -> Emit:
    """A bug on every ``every``-th record: 1 / 0 (after ``stall_s`` seconds)."""
    n = int(record.value)
    if n % ctx.config["every"] == 0:
        time.sleep(ctx.config.get("stall_s", 0))
    share = 1 / (n % ctx.config["every"])
    return Emit(record.key, record.value, headers={"share": f"{share:.3f}"})
'''


def project(tmp_path: Path, every: int, on_error: str, stall_s: float = 0) -> Path:
    (tmp_path / "bugs").mkdir()
    (tmp_path / "bugs" / "__init__.py").write_text("")
    (tmp_path / "bugs" / "divide.py").write_text(textwrap.dedent(DIVIDE))
    (tmp_path / "pipeline.yaml").write_text(
        textwrap.dedent(
            f"""\
            app_prefix: bugs
            lineage_topic: lineage
            failures_topic: failures
            paths: [.]
            topics:
              numbers:    {{partitions: 1, external: true}}
              shares:     {{partitions: 1}}
              divide.dlq: {{partitions: 1}}
              lineage:    {{partitions: 1}}
              failures:   {{partitions: 1, compacted: true}}
            stages:
              divide:
                uses: bugs.divide:divide
                inputs: [numbers]
                output: shares
                dlq: divide.dlq
                on_error: {on_error}
                config: {{every: {every}, stall_s: {stall_s}}}
            """
        )
    )
    return tmp_path / "pipeline.yaml"


def healthz(cluster: TopologyCluster) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{cluster.ports['divide']}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def test_a_bug_on_one_record_in_a_thousand_is_a_processing_error_dead_letter(tmp_path):
    with TopologyCluster(project(tmp_path, 1000, "dead_letter"), tmp_path / "run") as cluster:
        cluster.produce("numbers", (str(n) for n in range(1, 3001)), key="k")
        outputs = cluster.wait_for_records("shares", 2997, timeout=90)
        letters = cluster.wait_for_records("divide.dlq", 3)
        assert sorted(int(o.value or b"0") for o in outputs) == [
            n for n in range(1, 3001) if n % 1000
        ]
        assert sorted(int(d.value or b"0") for d in letters) == [1000, 2000, 3000]
        for d in letters:
            assert d.headers["dlq.reason"] == b"processing_error"
            assert d.headers["dlq.error.class"] == b"ZeroDivisionError"
            message = d.headers["dlq.error.message"].decode()
            assert "division by zero" in message and "divide.py:" in message  # the line
            assert len(message) <= 1500
        text = cluster.metrics_text("divide")
        assert 'pipeline_dlq_records_total{reason="processing_error",stage="divide"} 3.0' in text
        assert cluster.workers["divide"].poll() is None  # still running


def test_a_bug_on_every_other_record_stops_the_stage_on_its_budget(tmp_path):
    with TopologyCluster(project(tmp_path, 2, "dead_letter"), tmp_path / "run") as cluster:
        cluster.produce("numbers", (str(n) for n in range(1, 1001)), key="k")

        def stopped() -> bool:
            return 'pipeline_stage_stopped{stage="divide"} 1.0' in cluster.metrics_text("divide")

        cluster.wait_for(stopped, 60, "the dead-letter budget to stop the stage")
        status, body = healthz(cluster)
        assert status == 503 and "dlq_budget" in body["problems"], body
        assert "dlq_budget.max_ratio=25%" in body["problems"]["dlq_budget"], body
        time.sleep(2)
        # it stopped instead of dead-lettering half the stream: the batch that tripped
        # the budget was not delivered, and nothing after it
        letters = cluster.read("divide.dlq")
        assert len(letters) < 250 and len(cluster.read("shares")) < 250
        assert all(d.headers["dlq.reason"] == b"processing_error" for d in letters)
        assert cluster.workers["divide"].poll() is None  # parked, not crashing


def test_with_on_error_crash_the_worker_exits_70_and_a_crash_loop_is_visible(tmp_path):
    config = project(tmp_path, 5, "crash", stall_s=6)
    with TopologyCluster(config, tmp_path / "run") as cluster:
        cluster.produce("numbers", (str(n) for n in range(1, 11)), key="k")
        numbers = cluster.topic("numbers")
        assert cluster.workers["divide"].wait(timeout=60) == 70
        log = cluster.log("divide")
        assert "ZeroDivisionError" in log
        assert f"{numbers}[0] offsets 0-" in log and "(attempt 1 on this batch)" in log
        assert cluster.read("shares") == []  # the batch was never committed

        # restarted, as its supervisor would: the same batch, the same bug
        cluster.start_stage("divide")
        assert cluster.workers["divide"].wait(timeout=60) == 70
        assert "(attempt 2 on this batch)" in cluster.log("divide")
        shown = CliRunner().invoke(
            cli,
            ["--config", str(cluster.config_path), "status", "--sample-s", "0.5", "--json"],
            env={"KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap},
            catch_exceptions=False,
        )
        assert shown.exit_code == 1, shown.output
        assert (
            "divide crash-looping" in shown.output and f"{numbers}[0] at offset 0" in shown.output
        )
        (stage,) = json.loads(shown.stdout[: shown.stdout.rindex("}") + 1])["stages"]
        assert stage["verdict"] == "crash-looping" and stage["healthy"] is False
        (failure,) = stage["failures"]
        assert failure["offset"] == 0 and failure["attempts"] == 2
        assert "ZeroDivisionError" in failure["error"]

        # the third worker knows from its start that it is in a loop (here: while it
        # spends 6 s in the bad record): /healthz and the metric say where
        cluster.start_stage("divide")
        seen: dict = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, body = healthz(cluster)
            if status == 503 and "divide_crash_loop" in body.get("problems", {}):
                seen = body
                break
            assert cluster.workers["divide"].poll() is None, cluster.log("divide")[-1500:]
            time.sleep(0.2)
        problem = seen["problems"]["divide_crash_loop"]
        assert f"{numbers}[0] at offset 0" in problem and "failed 2 time(s)" in problem, problem
        metric = f'pipeline_batch_failures{{partition="0",stage="divide",topic="{numbers}"}} 2.0'
        assert metric in cluster.metrics_text("divide")
        assert cluster.workers["divide"].wait(timeout=60) == 70
        assert "(attempt 3 on this batch)" in cluster.log("divide")
