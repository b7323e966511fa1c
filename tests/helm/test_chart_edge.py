"""The doors in the chart: the HTTP gateway (Deployment, Service, HPA, PDB) and the
MQTT bridge (Deployment, metrics Service), restricted like the stages, with their
tokens and MQTT credentials only from existing Secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from pipeline.settings import load_settings
from tests.helm import test_chart_kubernetes_schema as kube_schema
from tests.helm import test_chart_security as security
from tests.helm.chart import (
    FULLNAME,
    MONITORING_API,
    SASL_VALUES,
    containers,
    env_of,
    matches,
    merged,
    render,
)

EDGE: dict[str, Any] = {
    "gateway": {"enabled": True, "tokensSecret": {"name": "gateway-tokens"}},
    "mqttBridge": {
        "enabled": True,
        "url": "mqtts://mqtt.internal:8883",
        "topics": ["$share/iot/devices/+/readings", "$share/iot/sites/+/gw/#"],
        "replicas": 3,
        "existingSecret": "mqtt-credentials",
        "secretKeys": {"username": "username", "password": "password", "caCert": "ca.crt"},
    },
    "metrics": {"serviceMonitor": {"enabled": True}},
    "networkPolicy": {"enabled": True},
}
EDGE_SASL = merged(SASL_VALUES, EDGE)


@pytest.mark.parametrize("values", [EDGE, EDGE_SASL], ids=["plaintext", "sasl"])
def test_edge_pods_are_restricted_like_the_stages(values: dict[str, Any]) -> None:
    security.test_every_pod_template_is_restricted(values)


@pytest.mark.parametrize("version", [kube_schema.MINIMUM, kube_schema.LATEST])
def test_edge_objects_validate_strictly(version: str) -> None:
    kube_schema.test_every_rendered_object_validates_strictly(EDGE_SASL, version)


def test_the_gateway_serves_readings_from_its_tokens_secret_and_scales_on_cpu() -> None:
    rendered = render(EDGE, api_versions=MONITORING_API)
    name = f"{FULLNAME}-gateway"
    deployment = rendered.one("Deployment", name)
    pod = deployment["spec"]["template"]
    (container,) = containers(pod)

    assert [*container["command"], *container["args"]] == [
        "pipeline",
        "serve-http",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--tokens-file",
        "/etc/gateway-tokens/tokens",
    ]
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["gateway-tokens"]["mountPath"] == "/etc/gateway-tokens"
    assert mounts["gateway-tokens"]["readOnly"] is True
    assert volumes["gateway-tokens"]["secret"] == {
        "secretName": "gateway-tokens",
        "defaultMode": 0o444,
        "items": [{"key": "tokens", "path": "tokens"}],
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = rendered.one("Service", name)
    assert matches(service["spec"]["selector"], pod["metadata"]["labels"])
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 80,
        "metrics": 9090,
    }
    hpa = rendered.one("HorizontalPodAutoscaler", name)
    assert hpa["spec"]["scaleTargetRef"]["name"] == name
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert rendered.one("PodDisruptionBudget", name)["spec"]["maxUnavailable"] == 1
    # the stages' Deployments do not select the gateway's pods, nor it theirs
    for stage in rendered.of_kind("Deployment"):
        if stage["metadata"]["name"] != name:
            assert not matches(stage["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    policy = rendered.one("NetworkPolicy", FULLNAME)
    assert {"port": "http", "protocol": "TCP"} in [
        p for rule in policy["spec"]["ingress"] for p in rule["ports"]
    ]


def test_the_bridge_has_its_credentials_and_ca_only_from_the_existing_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(EDGE)
    name = f"{FULLNAME}-mqtt-bridge"
    deployment = rendered.one("Deployment", name)
    pod = deployment["spec"]["template"]
    (container,) = containers(pod)
    env = env_of(container)

    assert deployment["spec"]["replicas"] == 3
    assert container["args"] == [
        "bridge-mqtt",
        "--mqtt",
        "mqtts://mqtt.internal:8883",
        "--topic",
        "$share/iot/devices/+/readings",
        "--topic",
        "$share/iot/sites/+/gw/#",
        "--metrics-port",
        "9090",
    ]
    for var, key in (
        ("PIPELINE_EDGE__MQTT__USERNAME", "username"),
        ("PIPELINE_EDGE__MQTT__PASSWORD", "password"),
    ):
        assert env[var] == {
            "name": var,
            "valueFrom": {"secretKeyRef": {"name": "mqtt-credentials", "key": key}},
        }
    assert env["PIPELINE_EDGE__MQTT__CLIENT_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    ca = {v["name"]: v for v in pod["spec"]["volumes"]}["mqtt-ca"]["secret"]
    assert ca["secretName"] == "mqtt-credentials"
    assert env["PIPELINE_EDGE__MQTT__CA_FILE"]["value"] == "/etc/mqtt-ca/" + ca["items"][0]["path"]
    service = rendered.one("Service", name)
    assert matches(service["spec"]["selector"], pod["metadata"]["labels"])
    # the settings the bridge loads from the rendered config and its literal env
    config = tmp_path / "pipeline.yaml"
    config.write_text(rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]["pipeline.yaml"])
    for var, entry in env.items():
        if "value" in entry:
            monkeypatch.setenv(var, entry["value"])
    monkeypatch.setenv("PIPELINE_CONFIG", str(config))
    monkeypatch.setenv("PIPELINE_EDGE__MQTT__PASSWORD", "from-the-secret")
    settings = load_settings()
    assert settings.edge.mqtt.ca_file == "/etc/mqtt-ca/ca.crt"
    assert settings.edge.mqtt.password is not None
    assert "from-the-secret" not in repr(settings)


def test_both_doors_are_off_by_default() -> None:
    names = render().names("Deployment")
    assert f"{FULLNAME}-gateway" not in names
    assert f"{FULLNAME}-mqtt-bridge" not in names


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"gateway": {"enabled": True}}, "gateway.tokensSecret.name"),
        (
            {"mqttBridge": {"enabled": True, "secretKeys": {"username": "u"}}},
            "mqttBridge.existingSecret",
        ),
        ({"mqttBridge": {"enabled": True, "topics": []}}, "mqttBridge.topics"),
        (
            {
                "gateway": {
                    "enabled": True,
                    "tokensSecret": {"name": "t"},
                    "autoscaling": {"minReplicas": 5, "maxReplicas": 2},
                }
            },
            "minReplicas 5 is above maxReplicas 2",
        ),
    ],
)
def test_incomplete_door_settings_fail_the_render(values: dict[str, Any], words: str) -> None:
    with pytest.raises(helm.HelmRenderError) as excinfo:
        render(values)
    assert words in str(excinfo.value)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"gateway": {"tokens": "abc"}}, "'tokens' not allowed"),
        ({"gateway": {"port": "8080"}}, "/gateway/port"),
        ({"mqttBridge": {"url": "tcp://x:1883"}}, "/mqttBridge/url"),
        ({"mqttBridge": {"url": "mqtt://user:pw@x:1883"}}, "/mqttBridge/url"),
        ({"mqttBridge": {"password": "pw"}}, "'password' not allowed"),
        ({"mqttBridge": {"env": {"PIPELINE_EDGE__MQTT__PASSWORD": "pw"}}}, "PASSWORD"),
    ],
)
def test_the_schema_refuses_credentials_and_wrong_types(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as excinfo:
        render(values)
    assert where in str(excinfo.value)


def test_the_values_document_both_doors() -> None:
    values = yaml.safe_load((Path(__file__).parents[2] / "helm/pipeline/values.yaml").read_text())
    assert values["gateway"]["enabled"] is False
    assert values["mqttBridge"]["enabled"] is False
