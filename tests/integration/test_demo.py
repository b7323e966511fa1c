"""`make demo`'s command, as a new user runs it: no broker configured (it starts the
embedded one), the four stages and the demo's Parquet sink as workers, the
simulator, and the check that every good reading is counted once, in the
aggregates topic and in the lake."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.dataset as ds

from tests.integration.harness import REPO


def test_the_demo_runs_end_to_end_on_its_own_broker(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "PIPELINE_"))}
    out = tmp_path / "demo-output"
    args = ["--duration", "6", "--devices", "8", "--rate", "80", "--window", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["broker"] == "embedded"
    assert summary["good_readings"] > 0
    assert summary["readings_in_windows"] == summary["good_readings"]
    assert summary["lake_readings"] == summary["good_readings"]
    assert summary["lake_windows"] == summary["windows"]
    lake = ds.dataset(str(out / "lake"), format="parquet", partitioning="hive").to_table()
    assert lake.num_rows == summary["windows"]
    assert sum(lake["count"].to_pylist()) == summary["good_readings"]
    assert (out / "aggregates.parquet").exists()
    assert "every good reading counted once" in done.stderr
