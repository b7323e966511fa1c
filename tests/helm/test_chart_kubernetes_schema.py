"""Every rendered object validates against the Kubernetes OpenAPI schemas, in
strict mode (unknown fields are errors), for the newest release
kubernetes-validate knows and for the chart's minimum (Chart.yaml kubeVersion).
Custom resources (KEDA, Prometheus Operator) have no schema there and are
checked by hand against their documented shape."""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helm.chart import (
    CHART_DIR,
    EVERYTHING,
    EVERYTHING_HPA,
    MONITORING_API,
    Obj,
    Rendered,
    matches,
    render,
)
from tests.helm.test_chart_sinks import SINKS

LATEST = kubernetes_validate.latest_version()
_KUBE_VERSION = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["kubeVersion"]
MINIMUM = re.search(r"[0-9]+\.[0-9]+", _KUBE_VERSION).group()  # type: ignore[union-attr]
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything-keda": EVERYTHING,
    "everything-hpa": EVERYTHING_HPA,
    "sinks": SINKS,
}


def _check_scaled_object(obj: Obj, rendered: Rendered) -> None:
    spec = obj["spec"]
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    assert set(spec) <= {
        "scaleTargetRef",
        "pollingInterval",
        "cooldownPeriod",
        "initialCooldownPeriod",
        "idleReplicaCount",
        "minReplicaCount",
        "maxReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    }
    assert set(spec["scaleTargetRef"]) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    assert spec["scaleTargetRef"]["name"] in rendered.names("Deployment")
    for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[key], int), key
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec["advanced"]) <= {
        "horizontalPodAutoscalerConfig",
        "restoreToOriginalReplicaCount",
    }
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert set(trigger) <= {"type", "metadata", "authenticationRef", "name", "metricType"}
        assert trigger["type"] in ("kafka", "prometheus")
        assert trigger.get("metricType", "AverageValue") in ("AverageValue", "Value")
        metadata = trigger["metadata"]
        if trigger["type"] == "kafka":
            assert {"bootstrapServers", "consumerGroup", "topic", "lagThreshold"} <= set(metadata)
        else:
            assert {"serverAddress", "query", "threshold"} <= set(metadata)
        assert all(isinstance(v, str) for v in metadata.values()), "KEDA metadata are strings"
        if "authenticationRef" in trigger:
            assert trigger["authenticationRef"]["name"] in rendered.names("TriggerAuthentication")


def _check_trigger_authentication(obj: Obj, rendered: Rendered) -> None:
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    assert set(obj["spec"]) == {"secretTargetRef"}
    for ref in obj["spec"]["secretTargetRef"]:
        assert set(ref) == {"parameter", "name", "key"}
        assert ref["parameter"] in {"username", "password", "ca", "cert", "key", "sasl", "tls"}


def _check_service_monitor(obj: Obj, rendered: Rendered) -> None:
    spec = obj["spec"]
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert spec["namespaceSelector"] == {"matchNames": [obj["metadata"]["namespace"]]}
    selected = [
        s
        for s in rendered.of_kind("Service")
        if matches(spec["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert selected
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
        assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint["interval"])
        for service in selected:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


CUSTOM_RESOURCES = {
    "ScaledObject": _check_scaled_object,
    "TriggerAuthentication": _check_trigger_authentication,
    "ServiceMonitor": _check_service_monitor,
}


@pytest.mark.parametrize("version", [MINIMUM, LATEST])
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_validates_strictly(values: dict[str, Any], version: str) -> None:
    rendered = render(values, api_versions=MONITORING_API)

    for obj in rendered.objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert DNS_LABEL.fullmatch(obj["metadata"]["name"]), where
        assert len(obj["metadata"]["name"]) <= 63, where
        assert obj["metadata"]["namespace"] == "data", where
        check = CUSTOM_RESOURCES.get(obj["kind"])
        if check is not None:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, version, strict=True)
            check(obj, rendered)
        else:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_custom_resources_are_covered() -> None:
    kinds = set(render(EVERYTHING, api_versions=MONITORING_API).kinds())

    assert set(CUSTOM_RESOURCES) <= kinds


def test_strict_validation_catches_an_unknown_field() -> None:
    """The validator is not vacuous: a misspelt field fails."""
    deployment = copy.deepcopy(render().of_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, LATEST, strict=True)
