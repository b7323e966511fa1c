"""The second pipeline (examples/gateway), whose stages live outside the core, run
end to end on the real broker as four `pipeline run` workers: fan-out with lineage,
a stateful stage, hopping windows from the framework's operator, a filter, dead
letters, lineage traces, metrics and status."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.kafka.clients import admin, producer
from pipeline.kafka.offsets import committed_offsets, read_topic
from tests.integration.harness import Pipeline, isolated_config, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway"
BASE = 1_767_225_600_000
DEVICES = ("d-0", "d-1", "d-2", "d-3")
THRESHOLD = 30.0


def messages() -> list[dict[str, Any]]:
    return [
        {
            "gateway": f"gw-{int(d[-1]) % 2}",
            "device_id": d,
            "ts": BASE + i * 1000,
            "metrics": {"temperature": 20.0 + (i % 15) + int(d[-1]), "humidity": 25.0 + i % 5},
        }
        for i in range(40)
        for d in DEVICES
    ]


def expected_windows(sent: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Hopping windows (10 s every 5 s) of every metric, computed directly."""
    acc: dict[tuple[str, str, int], list[tuple[int, float]]] = defaultdict(list)
    for m in sent:
        for metric, value in m["metrics"].items():
            ts = m["ts"]
            start = ts - ts % 5000
            while start > ts - 10_000:
                acc[(m["device_id"], metric, start)].append((ts, value))
                start -= 5000
    return {
        key: {
            "count": len(vals),
            "min": min(v for _, v in vals),
            "max": max(v for _, v in vals),
            "mean": sum(v for _, v in vals) / len(vals),
            "last": max(vals)[1],
        }
        for key, vals in acc.items()
    }


def cli_json(config: Path, bootstrap: str, *args: str) -> tuple[int, Any]:
    result = CliRunner().invoke(
        cli, ["--config", str(config), *args, "--json"], env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    )
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else None


def test_the_gateway_example_runs_end_to_end_on_its_own_stages(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap, source=EXAMPLE / "pipeline.yaml")
    topic = {name.split(".", 1)[1]: name for name in settings.topics}  # gw.x -> <tag>.gw.x
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    try:
        sent = messages()
        bad = [b"{not json", orjson.dumps({"device_id": "d", "ts": 1, "metrics": {"s": "x"}}),
               orjson.dumps([1, 2])]  # fmt: skip
        client = producer(settings)
        for m in [*sent, sent[7]]:  # one message delivered twice (at-least-once upstream)
            client.produce(topic["gw.landing"], orjson.dumps(m), m["device_id"].encode())
        for value in bad:
            client.produce(topic["gw.landing"], value, b"bad")
        assert client.flush(30) == 0

        expected = expected_windows(sent)

        def windows() -> dict[tuple[str, str, int], dict[str, Any]]:
            got = {}
            for msg in read_topic(settings, topic["gw.windows"]):
                w = orjson.loads(msg.value())
                got[(w["device_id"], w["metric"], w["window_start"])] = w
            return got

        wait_for(lambda: len(windows()) >= len(expected), 150, "every window", pipe.logs)
        got = windows()
        assert set(got) == set(expected)
        for key, want in expected.items():
            w = got[key]
            assert {k: w[k] for k in want} == want, key  # the repeated message counted once
            assert (
                w["gateway"] == f"gw-{int(key[0][-1]) % 2}" and w["window_end"] == key[2] + 10_000
            )

        # alerts: exactly the windows above the threshold, and nothing else
        def alerts() -> list[dict[str, Any]]:
            return [orjson.loads(m.value()) for m in read_topic(settings, topic["gw.alerts"])]

        above = {k for k, w in expected.items() if w["mean"] > THRESHOLD}
        assert above and len(above) < len(expected)
        wait_for(lambda: len(alerts()) >= len(above), 60, "the alerts", pipe.logs)
        assert {(a["device_id"], a["metric"], a["window_start"]) for a in alerts()} == above

        # dead letters with the envelope, from a stage the framework does not know
        letters = read_topic(settings, topic["gw.explode.dlq"])
        reasons = sorted(dict(m.headers())["dlq.reason"].decode() for m in letters)
        assert reasons == ["bad_payload", "decode_error", "no_metrics"]
        assert {dict(m.headers())["dlq.stage"] for m in letters} == {b"explode"}
        assert sorted(m.value() for m in letters) == sorted(bad)

        # a window without a mean, written by hand: the alert stage's own reason
        client.produce(topic["gw.windows"], orjson.dumps({"count": 1}), b"x")
        assert client.flush(30) == 0
        wait_for(
            lambda: len(read_topic(settings, topic["gw.alert.dlq"])) == 1, 60, "no_mean", pipe.logs
        )
        (letter,) = read_topic(settings, topic["gw.alert.dlq"])
        assert dict(letter.headers())["dlq.reason"] == b"no_mean"

        # lineage: a reading traces back through its fan-out to the gateway message
        reading = next(m for m in read_topic(settings, topic["gw.readings"]) if m.key() == b"d-2")
        headers = dict(reading.headers())
        child, parent = headers["lineage-id"].decode(), headers["lineage-parent"].decode()
        code, trace = cli_json(config, broker.bootstrap, "lineage", "trace", child)
        assert code == 0, trace
        assert [h["stage"] for h in trace["hops"]] == ["explode", "rate", "window", "window"]
        assert trace["parent"] == parent and trace["end"] == "window"
        assert {h["outcome"] for h in trace["hops"][2:]} == {"counted"}  # two hopping windows
        assert len(trace["windows"]) == 2
        code, trace = cli_json(config, broker.bootstrap, "lineage", "trace", parent)
        assert code == 0 and trace["end"] == "fanned_out" and len(trace["children"]) == 2

        # metrics labelled with the user's stage ids; status of the whole pipeline
        explode = pipe.workers["explode"][0]
        assert explode.counter("pipeline_records_consumed_total") == len(sent) + 1 + len(bad)
        assert explode.counter("pipeline_dlq_records_total") == 3
        rate = pipe.workers["rate"][0]
        assert rate.counter("pipeline_records_produced_total") == 2 * (len(sent) + 1)
        landing = [(topic["gw.landing"], p) for p in range(2)]
        client_admin = admin(settings)

        def explode_committed() -> int:
            offsets = committed_offsets(client_admin, settings.group_id("explode"), landing)
            return sum(v or 0 for v in offsets.values())

        wait_for(lambda: explode_committed() == len(sent) + 1 + len(bad), 30, "explode's commit")
        code, status = cli_json(config, broker.bootstrap, "status", "--sample-s", "1")
        assert [s["stage"] for s in status["stages"]] == ["explode", "rate", "window", "alert"]
        assert all(s["verdict"] in ("ok", "idle") for s in status["stages"]), status
        for proc in pipe.workers.values():
            assert all(p.alive() for p in proc)
    finally:
        pipe.stop_all()
