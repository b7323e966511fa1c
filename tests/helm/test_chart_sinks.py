"""Sinks in the chart: a Deployment like any stage, the sink's password from an
existing Secret (never a value), the Parquet sink's directory on a volume."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.helm.chart import FULLNAME, containers, env_of, merged, render

PASSWORD_ENV = "PIPELINE_STAGES__STORE__CONFIG__PASSWORD"

SINKS: dict[str, Any] = {
    "config": {
        "topics": {
            "iot.store.dlq": {"partitions": 1},
            "iot.lake.dlq": {"partitions": 1},
        },
        "stages": {
            "store": {
                "uses": "pipeline.sinks:postgres",
                "inputs": ["iot.aggregates"],
                "dlq": "iot.store.dlq",
                "config": {"dsn": "postgresql://pipeline@db:5432/iot", "table": "aggregates"},
            },
            "lake": {
                "uses": "pipeline.sinks:parquet",
                "inputs": ["iot.aggregates"],
                "dlq": "iot.lake.dlq",
                "config": {"path": "/data/lake", "partition_by": ["date", "site"]},
            },
        },
    },
    "stages": {
        "store": {"secretEnv": {PASSWORD_ENV: {"secretName": "pg-credentials", "key": "password"}}},
        "lake": {
            "volumes": [{"name": "lake", "persistentVolumeClaim": {"claimName": "iot-lake"}}],
            "volumeMounts": [{"name": "lake", "mountPath": "/data/lake"}],
        },
    },
}


def test_each_sink_is_a_deployment_with_its_secret_and_volume() -> None:
    rendered = render(SINKS)
    store = rendered.deployment("store")
    (container,) = containers(store["spec"]["template"])
    assert container["args"] == ["run", "store"]
    env = env_of(container)
    assert env[PASSWORD_ENV] == {
        "name": PASSWORD_ENV,
        "valueFrom": {"secretKeyRef": {"name": "pg-credentials", "key": "password"}},
    }
    lake = rendered.deployment("lake")
    pod = lake["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["lake"]["persistentVolumeClaim"] == {"claimName": "iot-lake"}
    (lake_container,) = containers(lake["spec"]["template"])
    mounts = {m["name"]: m["mountPath"] for m in lake_container["volumeMounts"]}
    assert mounts["lake"] == "/data/lake"
    assert lake_container["securityContext"]["readOnlyRootFilesystem"] is True
    # the ConfigMap's pipeline.yaml declares both sinks, the DLQ topics are created
    config = rendered.one("ConfigMap", f"{FULLNAME}-config")
    doc = yaml.safe_load(next(iter(config["data"].values())))
    assert doc["stages"]["store"]["uses"] == "pipeline.sinks:postgres"
    assert {"iot.store.dlq", "iot.lake.dlq"} <= set(doc["topics"])


@pytest.mark.parametrize(
    "values",
    [
        {"stages": {"store": {"secretEnv": {"PGPASSWORD": {"secretName": "pg"}}}}},
        {
            "stages": {
                "store": {"secretEnv": {"KAFKA_BOOTSTRAP_SERVERS": {"secretName": "a", "key": "b"}}}
            }
        },
        {"stages": {"store": {"env": {PASSWORD_ENV: "hunter2"}}}},
        {"stages": {"lake": {"volumes": {"name": "x"}}}},
    ],
)
def test_secrets_of_sinks_come_only_from_existing_secrets(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(merged(SINKS, values))
