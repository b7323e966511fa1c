"""Values the chart refuses: values.schema.json rejects wrong types and unknown
keys; templates refuse combinations that would deploy something broken. Kafka
credentials exist only as references to an existing Secret."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.helm.chart import (
    EVERYTHING,
    FULLNAME,
    MONITORING_API,
    SASL_VALUES,
    SECRET_NAME,
    containers,
    env_of,
    merged,
    pod_templates,
    render,
)

SCHEMA_REJECTS: list[tuple[dict[str, Any], str]] = [
    ({"stages": {"parse": {"replicas": "six"}}}, "/stages/parse/replicas"),
    ({"stages": {"parse": {"replicas": -1}}}, "/stages/parse/replicas"),
    ({"stages": {"parse": {"replica": 6}}}, "'replica' not allowed"),
    ({"stages": {"parse": {"stage": "Transform_1"}}}, "/stages/parse/stage"),
    ({"stages": {"parse": {"image": {"repo": "x"}}}}, "'repo' not allowed"),
    ({"stages": {"Parse_2": {"stage": "parse"}}}, "invalid propertyName 'Parse_2'"),
    ({"stages": {"parse": {"resources": {"request": {"cpu": 1}}}}}, "'request' not allowed"),
    ({"stages": {"parse": {"autoscaling": {"maxReplicas": "4"}}}}, "/autoscaling/maxReplicas"),
    ({"stages": {"parse": {"autoscaling": {"lagthreshold": 5}}}}, "'lagthreshold' not allowed"),
    ({"stages": {"parse": {"env": {"PIPELINE_LOG_LEVEL": {"a": 1}}}}}, "PIPELINE_LOG_LEVEL"),
    ({"stages": {"parse": {"env": {"PIPELINE_METRICS_PORT": "80"}}}}, "PIPELINE_METRICS_PORT"),
    ({"stages": {"parse": {"terminationGracePeriodSeconds": "60s"}}}, "terminationGrace"),
    (
        {"stages": {"parse": {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}}}},
        "podDisruptionBudget",
    ),
    ({"replicaCount": 3}, "'replicaCount' not allowed"),
    ({"kafka": {"bootstrapServers": 9092}}, "/kafka/bootstrapServers"),
    ({"kafka": {"bootstrapServers": "kafka"}}, "/kafka/bootstrapServers"),
    ({"kafka": {"securityProtocol": "TLS"}}, "/kafka/securityProtocol"),
    ({"kafka": {"securityProtocol": "SASL_SSL", "saslMechanism": "PLAIN"}}, "existingSecret"),
    ({"metrics": {"port": 80}}, "/metrics/port"),
    ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
    ({"autoscaling": {"keda": {"enabled": 1}}}, "/autoscaling/keda/enabled"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    (
        {"config": {"stages": {"transform": {"inputs": ["a"], "output": "b", "dlq": "c"}}}},
        "transform",
    ),
    ({"config": {"topics": {"iot.raw": {"partitions": "4"}}}}, "partitions"),
    ({"config": {"metrics_port": 9100}}, "invalid propertyName 'metrics_port'"),
    ({"backfill": {"enabled": True, "fromTopic": "iot.raw"}}, "/backfill/runId"),
    ({"backfill": {"rate": "fast"}}, "/backfill/rate"),
]


@pytest.mark.parametrize(("values", "where"), SCHEMA_REJECTS, ids=[w for _, w in SCHEMA_REJECTS])
def test_schema_rejects_wrong_types_and_unknown_keys(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as excinfo:
        render(values)

    assert where in str(excinfo.value)


def test_schema_accepts_every_documented_stage_key() -> None:
    entry = {
        "enabled": True,
        "stage": "enrich",
        "replicas": 2,
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "env": {"PIPELINE_RUNNER__BATCH_MAX_RECORDS": 500, "PIPELINE_LOG_LEVEL": "debug"},
        "autoscaling": {"enabled": False, "maxReplicas": 4},
        "podDisruptionBudget": {"minAvailable": 1},
        "terminationGracePeriodSeconds": 90,
        "nodeSelector": {"pool": "streaming"},
        "tolerations": [{"key": "streaming", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {},
        "topologySpreadConstraints": [],
        "priorityClassName": "",
        "podAnnotations": {"team": "data"},
        "podLabels": {"cost-center": "iot"},
    }
    rendered = render({"stages": {"enrich-eu": entry}})

    pod = rendered.deployment("enrich-eu")["spec"]["template"]
    env = env_of(pod["spec"]["containers"][0])
    assert env["PIPELINE_RUNNER__BATCH_MAX_RECORDS"]["value"] == "500"
    assert pod["spec"]["nodeSelector"] == {"pool": "streaming"}
    assert pod["metadata"]["labels"]["cost-center"] == "iot"
    pdb = rendered.one("PodDisruptionBudget", f"{FULLNAME}-enrich-eu")
    assert pdb["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in pdb["spec"]


def test_pdb_takes_min_available_from_the_defaults_unless_the_entry_says_otherwise() -> None:
    rendered = render(
        {
            "stageDefaults": {"podDisruptionBudget": {"minAvailable": 1}},
            "stages": {"ingest": {"podDisruptionBudget": {"maxUnavailable": "50%"}}},
        }
    )

    specs = {
        s: rendered.one("PodDisruptionBudget", f"{FULLNAME}-{s}")["spec"]
        for s in ("ingest", "parse")
    }
    assert (specs["ingest"]["maxUnavailable"], "minAvailable" in specs["ingest"]) == ("50%", False)
    assert (specs["parse"]["minAvailable"], "maxUnavailable" in specs["parse"]) == (1, False)


TEMPLATE_REFUSES: list[tuple[dict[str, Any], str]] = [
    (
        {"stages": {"parse": {"autoscaling": {"enabled": True, "maxReplicas": 8}}}},
        "maxReplicas is 8 but the input topic of stage parse has 4 partitions",
    ),
    (
        {
            "stages": {
                "parse": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}}
            }
        },
        "minReplicas 3 is above maxReplicas 2",
    ),
    (
        {"stages": {"parse": {"terminationGracePeriodSeconds": 15}}},
        "less than twice the session timeout (10 s",
    ),
    (
        {"stages": {"aggregate": {"env": {"PIPELINE_RUNNER__SESSION_TIMEOUT_S": 45}}}},
        "terminationGracePeriodSeconds 60 is less than twice the session timeout (45 s",
    ),
    (
        {"backfill": {"enabled": True, "runId": "r1"}},
        "set backfill.fromParquet or backfill.fromTopic",
    ),
    (
        {"backfill": {"enabled": True, "runId": "r1", "fromTopic": "iot.raw"}},
        "backfill.fromTopic needs backfill.start and backfill.end",
    ),
    (
        {"backfill": {"enabled": True, "runId": "r1", "fromTopic": "t", "fromParquet": "/p"}},
        "either fromParquet or fromTopic",
    ),
    (
        {"stages": {"x" * 40: {"stage": "parse"}}, "fullnameOverride": "y" * 30},
        "longer than 63 characters",
    ),
    (
        {"stages": {"parse-canary": {"replicas": 1}}},
        '"parse-canary" is not a pipeline stage; set stages.parse-canary.stage to one of: '
        "aggregate enrich ingest parse",
    ),
    ({"stages": {"parse": {"stage": "transform"}}}, '"transform" is not a pipeline stage'),
]


@pytest.mark.parametrize(
    ("values", "message"), TEMPLATE_REFUSES, ids=[m for _, m in TEMPLATE_REFUSES]
)
def test_templates_refuse_broken_combinations_with_a_clear_message(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as excinfo:
        render(values)

    assert message in str(excinfo.value)


# Every place a literal password could be slipped in through values.
PASSWORD = "hunter2-do-not-render"
PASSWORD_ATTEMPTS: list[dict[str, Any]] = [
    {"kafka": {"password": PASSWORD}},
    {"kafka": {"saslPassword": PASSWORD}},
    {"kafka": {"sasl": {"password": PASSWORD}}},
    {"env": {"PIPELINE_KAFKA_SASL_PASSWORD": PASSWORD}},
    {"env": {"KAFKA_PASSWORD": PASSWORD}},
    {"env": {"PIPELINE_OPENLINEAGE__API_KEY": PASSWORD}},
    {"stages": {"parse": {"env": {"PIPELINE_KAFKA_SASL_PASSWORD": PASSWORD}}}},
    {"stages": {"parse": {"env": {"api_token": PASSWORD}}}},
    {"config": {"kafka_sasl_password": PASSWORD}},
]


@pytest.mark.parametrize("values", PASSWORD_ATTEMPTS)
def test_no_value_can_carry_a_password(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(merged(SASL_VALUES, values))


def test_credentials_come_only_from_the_existing_secret() -> None:
    rendered = render(EVERYTHING, api_versions=MONITORING_API)
    secret = SASL_VALUES["kafka"]["existingSecret"]

    assert rendered.of_kind("Secret") == []
    templates = list(pod_templates(rendered))
    assert len(templates) == 7  # 5 stage Deployments, the topics Job, the backfill Job
    for where, pod in templates:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["kafka-ca"]["secret"]["secretName"] == secret, where
        for container in containers(pod):
            env = env_of(container)
            for name in ("PIPELINE_KAFKA_SASL_USERNAME", "PIPELINE_KAFKA_SASL_PASSWORD"):
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret, where
                assert "value" not in env[name], where
            for name, entry in env.items():
                if SECRET_NAME.search(name):
                    assert set(entry) == {"name", "valueFrom"}, f"{where}: {name}"
            # The CA file the app is told about is the one mounted from the Secret.
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            ca_dir = mounts["kafka-ca"]["mountPath"]
            (item,) = volumes["kafka-ca"]["secret"]["items"]
            assert env["PIPELINE_KAFKA_SSL_CAFILE"]["value"] == f"{ca_dir}/{item['path']}"
            assert item["key"] == "ca.crt"
            assert env["PIPELINE_KAFKA_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512"
    # KEDA reads the same Secret, by reference.
    (auth,) = rendered.of_kind("TriggerAuthentication")
    assert {r["name"] for r in auth["spec"]["secretTargetRef"]} == {secret}
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {
        "username",
        "password",
        "ca",
    }


def test_plaintext_kafka_renders_no_credentials_at_all() -> None:
    rendered = render()

    for where, pod in pod_templates(rendered):
        assert "kafka-ca" not in {v["name"] for v in pod["spec"]["volumes"]}, where
        for container in containers(pod):
            env = env_of(container)
            assert env["PIPELINE_KAFKA_SECURITY_PROTOCOL"]["value"] == "PLAINTEXT"
            assert not [n for n in env if "SASL" in n or "SSL_CAFILE" in n], where


def test_the_openlineage_api_key_comes_only_from_an_existing_secret() -> None:
    rendered = render({"openlineage": {"apiKeySecret": {"name": "marquez", "key": "token"}}})
    templates = list(pod_templates(rendered))
    assert templates
    for where, pod in templates:
        for container in containers(pod):
            entry = env_of(container)["PIPELINE_OPENLINEAGE__API_KEY"]
            assert entry == {
                "name": "PIPELINE_OPENLINEAGE__API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "marquez", "key": "token"}},
            }, where
    for _, pod in pod_templates(render()):  # no secret named: no variable
        for container in containers(pod):
            assert "PIPELINE_OPENLINEAGE__API_KEY" not in env_of(container)
    with pytest.raises(helm.HelmValuesError):
        render({"openlineage": {"apiKey": PASSWORD}})
