"""The second pipeline's stages (examples/gateway), tested as a user tests their own:
in memory with pipeline.testing, no broker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.testing import StageHarness, record, run_stage

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway"


@pytest.fixture(scope="module", autouse=True)
def _example_on_path():
    sys.path.insert(0, str(EXAMPLE))
    yield
    sys.path.remove(str(EXAMPLE))


def test_explode_makes_one_reading_per_numeric_metric_with_its_own_lineage_id():
    from gateway_stages.explode import explode

    message = {
        "gateway": "gw-1",
        "device_id": "d-1",
        "ts": 1_767_225_600_000,
        "metrics": {"temperature": 21.5, "humidity": 40, "status": "ok"},
    }
    run = run_stage(
        explode, [record(message, headers={"lineage-id": "01KDVDNA001HNZM0H47SFSK2H2"})]
    )
    assert run.values() == [
        {"gateway": "gw-1", "device_id": "d-1", "ts": 1_767_225_600_000, "metric": m, "value": v}
        for m, v in (("humidity", 40.0), ("temperature", 21.5))
    ]
    assert len({o.header("lineage-id") for o in run.outputs}) == 2
    assert {o.key for o in run.outputs} == {b"d-1"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "decode_error"),
        ([1, 2], "bad_payload"),
        ({"device_id": "d", "ts": "yesterday", "metrics": {}}, "bad_payload"),
        ({"device_id": "d", "ts": 1, "metrics": {"a": "x", "b": float("nan")}}, "no_metrics"),
    ],
)
def test_explode_dead_letters_what_it_cannot_read(payload, reason):
    from gateway_stages.explode import explode

    run = run_stage(explode, [record(payload)])
    assert [d.reason for d in run.dead_letters] == [reason] and not run.outputs


def test_rate_is_the_change_per_second_since_the_last_newer_reading():
    from gateway_stages.rate import rate

    harness = StageHarness(rate)

    def reading(ts: int, value: float) -> object:
        return record({"device_id": "d", "metric": "t", "ts": ts, "value": value})

    first = harness.run([reading(1_000, 10.0), reading(3_000, 14.0)])
    assert [v["rate_per_s"] for v in first.values()] == [None, 2.0]
    harness.restart()  # the last reading comes back from the changelog
    again = harness.run([reading(2_000, 0.0), reading(4_000, 13.0)])
    assert [v["rate_per_s"] for v in again.values()] == [None, -1.0]  # older: no rate


def test_alert_passes_windows_above_the_threshold_and_dead_letters_windows_without_mean():
    from gateway_stages.alert import alert

    run = run_stage(
        alert,
        [record({"mean": 31.0}), record({"mean": 29.0}), record({"count": 3})],
        config={"threshold": 30},
    )
    assert run.values() == [{"mean": 31.0}]
    assert [d.reason for d in run.dead_letters] == ["no_mean"]
    # the records entered here without lineage ids: each gets one derived where it
    # entered, the same in its output, its dead letter and its hop
    assert sorted(h["outcome"] for h in run.hops) == ["dead_letter", "dropped", "passed"]
    ids = {h["outcome"]: h["id"] for h in run.hops}
    assert run.outputs[0].header("lineage-id") == ids["passed"]
    assert run.dead_letters[0].header("lineage-id") == ids["dead_letter"]
