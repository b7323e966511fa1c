"""Topic provisioning and CLI errors against the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner
from confluent_kafka.admin import NewTopic

from pipeline.cli.main import cli
from pipeline.kafka.clients import admin
from tests.integration.harness import REPO, isolated_config


def run_pipeline(args, env, timeout):
    """The `pipeline` command as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def run_cli(args, env=None):
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def test_topics_create_is_idempotent_and_list_reports_json(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)  # creates them once
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
    again = run_cli(["--config", str(config), "topics", "create", "--json"], env)
    assert again.exit_code == 0, again.output
    statuses = json.loads(again.stdout)
    assert {s["status"] for s in statuses} == {"exists"}
    assert {s["name"] for s in statuses} == set(settings.topics)
    listed = json.loads(run_cli(["--config", str(config), "topics", "list", "--json"], env).stdout)
    by_name = {s["name"]: s for s in listed}
    for name, spec in settings.topics.items():
        assert by_name[name]["actual_partitions"] == spec.partitions


def test_partition_mismatch_is_reported_not_fixed(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    text = config.read_text()
    name = next(n for n in settings.topics if n.endswith(".iot.landing"))
    client = admin(settings)
    odd = name.replace("iot.landing", "iot.odd")
    client.create_topics([NewTopic(odd, 2, -1)])[odd].result()
    config.write_text(text.replace("topics:\n", f"topics:\n  {odd}:\n    partitions: 3\n", 1))
    result = run_cli(
        ["--config", str(config), "topics", "create"], {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
    )
    assert result.exit_code == 2
    assert f"topic {odd} exists with 2 partitions, pipeline.yaml says 3" in result.output


def test_cli_errors_are_one_line_with_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("topics: {}\nstages: {}\n")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": ""}
    env.pop("KAFKA_BOOTSTRAP_SERVERS")
    proc = run_pipeline(["--config", str(bad), "topics", "list"], env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: invalid setting")
    proc = run_pipeline(["topics", "list"], env, timeout=60)
    assert proc.returncode == 3
    assert proc.stderr.strip() == (
        "error: no broker configured; set KAFKA_BOOTSTRAP_SERVERS or run `pipeline broker`"
    )
    result = CliRunner().invoke(cli, ["run", "transform"])
    assert result.exit_code == 2 and "transform" in result.output


def test_unreachable_broker_is_a_clear_error_not_a_hang(tmp_path):
    from pipeline.kafka.embedded import free_port

    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    proc = run_pipeline(["topics", "list"], env, timeout=90)
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: cannot read topic metadata")


def test_reading_commands_on_an_unreachable_broker_exit_3_with_one_line():
    from pipeline.kafka.embedded import free_port

    env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    result = run_cli(["lineage", "trace", "01JZZZZZZZZZZZZZZZZZZZZZZZ"], env)
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is the broker at KAFKA_BOOTSTRAP_SERVERS up?" in lines[0]


def test_a_worker_without_a_broker_exits_3_after_its_connect_timeout():
    from pipeline.kafka.embedded import free_port

    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "PIPELINE_RUNNER__CONNECT_TIMEOUT_S": "2",
    }
    proc = run_pipeline(["run", "parse"], env, timeout=60)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Kafka broker answered at"), lines


def test_the_producing_commands_on_an_unreachable_broker_exit_3_with_one_line(tmp_path):
    """`devices load` and `simulate` wait for acknowledgements and, when none come,
    say so in one line (no traceback), like every other command."""
    from pipeline.kafka.embedded import free_port

    registry = tmp_path / "devices.csv"
    registry.write_text("device_id,site,device_type,unit\ndev-1,site-a,thermometer,C\n")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    commands = {
        "devices load": ["devices", "load", str(registry)],
        "simulate": ["simulate", "--duration", "0.5", "--rate", "10"],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for name, args in commands.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, (name, err)
        assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
        assert "Traceback" not in err
        assert "not acknowledged" in err or "check that the broker is up" in err, (name, err)
