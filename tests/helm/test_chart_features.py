"""Optional objects appear only when enabled: KEDA ScaledObject (or the HPA
fallback), ServiceMonitor (or scrape annotations), the backfill Job, the
Grafana dashboard."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.obs import metrics
from pipeline.settings import load_settings
from tests.helm.chart import (
    FULLNAME,
    MONITORING_API,
    NAMESPACE,
    REPO,
    SASL_VALUES,
    STAGE_IDS,
    matches,
    merged,
    render,
)

AUTOSCALED = {"stages": {"parse": {"autoscaling": {"enabled": True, "maxReplicas": 4}}}}
OPTIONAL_KINDS = (
    "ScaledObject",
    "TriggerAuthentication",
    "HorizontalPodAutoscaler",
    "ServiceMonitor",
    "NetworkPolicy",
)


def test_defaults_render_no_optional_object() -> None:
    rendered = render()

    assert not [k for k in OPTIONAL_KINDS if rendered.of_kind(k)]
    assert rendered.names("Job") == {f"{FULLNAME}-topics"}
    assert rendered.names("ConfigMap") == {f"{FULLNAME}-config", f"{FULLNAME}-topics"}


def test_keda_scales_a_stage_on_its_consumer_group_lag() -> None:
    rendered = render(AUTOSCALED)
    settings = load_settings(REPO / "config" / "pipeline.yaml")

    (scaled,) = rendered.of_kind("ScaledObject")
    assert rendered.of_kind("HorizontalPodAutoscaler") == []
    assert scaled["metadata"]["name"] == f"{FULLNAME}-parse"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-parse",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    assert spec["maxReplicaCount"] <= settings.topics["iot.raw"].partitions
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"] == {
        "bootstrapServers": "kafka:9092",
        "consumerGroup": settings.group_id("parse"),
        "topic": "iot.raw",
        "lagThreshold": "1000",
        "activationLagThreshold": "10",
        "offsetResetPolicy": "earliest",
    }
    # The autoscaler owns the replica count; Helm must not reset it on upgrade.
    assert "replicas" not in rendered.deployment("parse")["spec"]
    assert rendered.deployment("ingest")["spec"]["replicas"] == 1


PROMETHEUS = {"autoscaling": {"keda": {"prometheus": {"serverAddress": "http://prom:9090"}}}}


def test_with_a_prometheus_keda_also_scales_on_lag_in_seconds() -> None:
    rendered = render(merged(AUTOSCALED, PROMETHEUS))

    (scaled,) = rendered.of_kind("ScaledObject")
    kafka, prometheus = scaled["spec"]["triggers"]
    assert kafka["type"] == "kafka"
    assert prometheus == {
        "type": "prometheus",
        "metricType": "Value",
        "metadata": {
            "serverAddress": "http://prom:9090",
            "query": f'max(pipeline_consumer_lag_seconds{{stage="parse",namespace="{NAMESPACE}"}})',
            "threshold": "30",
            "activationThreshold": "5",
            "ignoreNullValues": "true",
        },
    }


def test_lag_in_seconds_per_stage_threshold_selector_and_off_switch() -> None:
    values = merged(
        AUTOSCALED,
        PROMETHEUS,
        {"autoscaling": {"keda": {"prometheus": {"selector": 'service=~"iot-.*"'}}}},
        {"stages": {"parse": {"autoscaling": {"lagSecondsThreshold": 2.5}}}},
        {"stages": {"enrich": {"autoscaling": {"enabled": True, "lagSecondsThreshold": 0}}}},
    )
    rendered = render(values)
    by_name = {o["metadata"]["name"]: o for o in rendered.of_kind("ScaledObject")}
    parse = by_name[f"{FULLNAME}-parse"]["spec"]["triggers"][-1]["metadata"]
    assert parse["query"] == 'max(pipeline_consumer_lag_seconds{stage="parse",service=~"iot-.*"})'
    assert parse["threshold"] == "2.5"
    enrich = by_name[f"{FULLNAME}-enrich"]["spec"]["triggers"]
    assert [t["type"] for t in enrich] == ["kafka"]  # 0 s: records only


def test_without_a_prometheus_keda_scales_on_records_only() -> None:
    (scaled,) = render(AUTOSCALED).of_kind("ScaledObject")
    assert [t["type"] for t in scaled["spec"]["triggers"]] == ["kafka"]


def test_keda_over_sasl_ssl_authenticates_from_the_existing_secret() -> None:
    rendered = render(merged(SASL_VALUES, AUTOSCALED))

    (scaled,) = rendered.of_kind("ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    assert trigger["metadata"]["tls"] == "enable"
    (auth,) = rendered.of_kind("TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}


def test_without_keda_the_fallback_is_a_cpu_hpa() -> None:
    rendered = render(merged(AUTOSCALED, {"autoscaling": {"keda": {"enabled": False}}}))

    assert rendered.of_kind("ScaledObject") == []
    (hpa,) = rendered.of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-parse"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "replicas" not in rendered.deployment("parse")["spec"]


def _scrape_annotations(rendered_pod: dict[str, object]) -> dict[str, str]:
    annotations: dict[str, str] = rendered_pod["metadata"]["annotations"]  # type: ignore[index]
    return {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")}


def test_without_a_servicemonitor_pods_carry_scrape_annotations() -> None:
    for values in ({}, {"metrics": {"serviceMonitor": {"enabled": True}}}):
        # Enabled, but the cluster does not serve monitoring.coreos.com/v1.
        rendered = render(values)

        assert rendered.of_kind("ServiceMonitor") == []
        for stage in STAGE_IDS:
            pod = rendered.deployment(stage)["spec"]["template"]
            assert _scrape_annotations(pod) == {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9090",
                "prometheus.io/path": "/metrics",
            }


def test_servicemonitor_when_enabled_and_the_api_exists() -> None:
    assert render(api_versions=MONITORING_API).of_kind("ServiceMonitor") == []

    values = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    rendered = render(values, api_versions=MONITORING_API)

    (monitor,) = rendered.of_kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s for s in rendered.of_kind("Service") if matches(selector, s["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in selected} == {f"{FULLNAME}-{s}" for s in STAGE_IDS}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for service in selected:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    for stage in STAGE_IDS:
        assert _scrape_annotations(rendered.deployment(stage)["spec"]["template"]) == {}


def test_backfill_job_only_when_enabled() -> None:
    assert not [j for j in render().names("Job") if "backfill" in j]

    rendered = render(
        {
            "backfill": {
                "enabled": True,
                "runId": "june-fix",
                "fromTopic": "iot.raw",
                "start": "2024-06-01T00:00:00Z",
                "end": "2024-06-02T00:00:00Z",
                "rate": 250,
            }
        }
    )

    job = rendered.one("Job", f"{FULLNAME}-backfill-june-fix")
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {})
    assert job["spec"]["backoffLimit"] == 0
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert [*container["command"], *container["args"]] == [
        "pipeline",
        "backfill",
        "run",
        "--from-topic",
        "iot.raw",
        "--start",
        "2024-06-01T00:00:00Z",
        "--end",
        "2024-06-02T00:00:00Z",
        "--rate",
        "250",
        "--run-id",
        "june-fix",
    ]


def test_backfill_from_parquet_mounts_the_given_volume() -> None:
    backfill = {
        "enabled": True,
        "runId": "r7",
        "fromParquet": "/data/readings.parquet",
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "readings"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
    }
    job = render({"backfill": backfill}).one("Job", f"{FULLNAME}-backfill-r7")

    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == [
        "backfill",
        "run",
        "--from-parquet",
        "/data/readings.parquet",
        "--run-id",
        "r7",
    ]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "readings"}} in pod["volumes"]


def _declared_metric_names() -> set[str]:
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.REGISTRY.collect()
    }


def test_grafana_dashboard_only_when_enabled_and_built_on_the_declared_metrics() -> None:
    assert f"{FULLNAME}-dashboard" not in render().names("ConfigMap")

    configmap = render({"grafanaDashboard": {"enabled": True}}).one(
        "ConfigMap", f"{FULLNAME}-dashboard"
    )

    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["iot-pipeline.json"])
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for expr in exprs
        for name in re.findall(r"\bpipeline_[a-z0-9_]+", expr)
    }
    assert used == _declared_metric_names()
    # every stage panel follows the $stage variable; the doors are not stages
    assert all('stage=~"$stage"' in expr for expr in exprs if "pipeline_edge_" not in expr)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


@pytest.mark.parametrize("enabled", [False, True])
def test_network_policy_only_when_enabled(enabled: bool) -> None:
    rendered = render({"networkPolicy": {"enabled": enabled}})

    policies = rendered.of_kind("NetworkPolicy")
    assert len(policies) == int(enabled)
    if enabled:
        (rule,) = policies[0]["spec"]["ingress"]  # no gateway: the metrics port only
        assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
