"""What the chart renders: one Deployment per stage entry, running its stage, with
the objects around it; the ConfigMap is the pipeline.yaml the app accepts."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import pytest
import yaml

from pipeline.settings import Settings, load_settings
from tests.helm.chart import (
    CHART_DIR,
    EVERYTHING,
    FULLNAME,
    MONITORING_API,
    REPO,
    STAGE_IDS,
    Rendered,
    env_of,
    matches,
    render,
)

BOOTSTRAP = "kafka-0.kafka.svc:9092,kafka-1.kafka.svc:9092"


def _lint_problems(values: dict[str, object] | None = None) -> list[str]:
    report = helm.lint(CHART_DIR, values, strict=True, namespace="data")
    warnings = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    return [*report["errors"], *warnings]


def test_helm_lint_strict_passes_with_defaults_and_with_every_feature() -> None:
    assert _lint_problems() == []
    assert _lint_problems(EVERYTHING) == []


def test_default_render_is_four_stages_and_the_objects_around_them() -> None:
    rendered = render()

    assert rendered.kinds() == {
        "Deployment": 4,
        "Service": 4,
        "PodDisruptionBudget": 4,
        "ConfigMap": 2,  # pipeline.yaml, and its copy for the pre-install hook
        "Job": 1,
        "ServiceAccount": 1,
    }
    assert rendered.names("Deployment") == {f"{FULLNAME}-{s}" for s in STAGE_IDS}
    assert rendered.names("Service") == rendered.names("Deployment")
    assert rendered.names("PodDisruptionBudget") == rendered.names("Deployment")
    job = rendered.one("Job", f"{FULLNAME}-topics")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert [*container["command"], *container["args"]] == ["pipeline", "topics", "create"]


@pytest.mark.parametrize("stage", STAGE_IDS)
def test_each_deployment_runs_its_own_stage_against_the_configured_kafka(stage: str) -> None:
    rendered = render({"kafka": {"bootstrapServers": BOOTSTRAP}})
    deployment = rendered.deployment(stage)
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = env_of(container)

    assert [*container["command"], *container["args"]] == ["pipeline", "run", stage]
    assert deployment["spec"]["replicas"] == 1
    assert pod["metadata"]["labels"]["iot-pipeline/stage"] == stage
    assert env["KAFKA_BOOTSTRAP_SERVERS"]["value"] == BOOTSTRAP
    assert env["PIPELINE_METRICS_HOST"]["value"] == "0.0.0.0"
    assert env["PIPELINE_METRICS_PORT"]["value"] == "9090"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # A clean leave of the consumer group needs twice the session timeout (10 s).
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 2 * 10
    # The config file the env names is the mounted ConfigMap.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert env["PIPELINE_CONFIG"]["value"] == f"{mounts['config']}/pipeline.yaml"
    assert volumes["config"]["configMap"]["name"] == f"{FULLNAME}-config"
    # Service and PDB select exactly this Deployment's pods.
    labels = pod["metadata"]["labels"]
    service = rendered.one("Service", f"{FULLNAME}-{stage}")
    pdb = rendered.one("PodDisruptionBudget", f"{FULLNAME}-{stage}")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert matches(service["spec"]["selector"], labels)
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_configmap_is_the_repository_pipeline_yaml() -> None:
    configmap = render().one("ConfigMap", f"{FULLNAME}-config")
    shipped = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())

    assert yaml.safe_load(configmap["data"]["pipeline.yaml"]) == shipped, (
        "helm/pipeline/values.yaml `config` differs from config/pipeline.yaml: update the chart"
    )


def _settings_of(
    rendered: Rendered, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The Settings a container of Deployment ``key`` would load: the rendered file
    and the container's literal env."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]["pipeline.yaml"])
    (container,) = rendered.deployment(key)["spec"]["template"]["spec"]["containers"]
    for name, entry in env_of(container).items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    monkeypatch.setenv("PIPELINE_CONFIG", str(config))
    return load_settings()


def test_rendered_config_and_env_are_accepted_by_the_pipeline_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render({"kafka": {"bootstrapServers": BOOTSTRAP}, "logLevel": "warning"})

    settings = _settings_of(rendered, "enrich", tmp_path, monkeypatch)

    assert settings.kafka_bootstrap_servers == BOOTSTRAP
    assert settings.metrics_host == "0.0.0.0"
    assert settings.metrics_port == 9090
    assert settings.log_level == "warning"


def test_scaling_one_stage_with_set_leaves_the_others_alone() -> None:
    rendered = render(helm.parse_set_string("stages.parse.replicas=6"))

    replicas = {s: rendered.deployment(s)["spec"]["replicas"] for s in STAGE_IDS}
    assert replicas == {"ingest": 1, "parse": 6, "enrich": 1, "aggregate": 1}


def test_a_fifth_entry_is_a_second_deployment_of_a_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = {"stage": "parse", "replicas": 2, "env": {"PIPELINE_LOG_LEVEL": "debug"}}
    rendered = render({"stages": {"parse-canary": canary}})

    assert rendered.kinds()["Deployment"] == 5
    deployment = rendered.deployment("parse-canary")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert [*container["command"], *container["args"]] == ["pipeline", "run", "parse"]
    assert deployment["spec"]["replicas"] == 2
    assert env_of(container)["PIPELINE_LOG_LEVEL"]["value"] == "debug"
    assert _settings_of(rendered, "parse-canary", tmp_path, monkeypatch).log_level == "debug"
    # Its own Service and PDB, which do not select the main parse pods, nor the
    # main ones the canary's (Deployments with overlapping selectors fight).
    parse_labels = rendered.deployment("parse")["spec"]["template"]["metadata"]["labels"]
    canary_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        obj = rendered.one(kind, f"{FULLNAME}-parse-canary")
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert matches(selector, canary_labels)
        assert not matches(selector, parse_labels)
    main_selector = rendered.deployment("parse")["spec"]["selector"]["matchLabels"]
    assert not matches(main_selector, canary_labels)


def test_a_stage_entry_can_be_disabled() -> None:
    rendered = render({"stages": {"ingest": {"enabled": False}}})

    assert rendered.names("Deployment") == {f"{FULLNAME}-{s}" for s in STAGE_IDS[1:]}
    assert rendered.names("Service") == rendered.names("Deployment")


def test_config_changes_roll_the_stages() -> None:
    def checksum(values: dict[str, object]) -> str:
        pod = render(values).deployment("parse")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) != checksum({"config": {"runner": {"batch_max_records": 500}}})


def test_notes_say_how_each_stage_runs() -> None:
    notes = render(EVERYTHING, api_versions=MONITORING_API).notes

    assert "iot-pipeline-parse-canary: pipeline run parse" in notes
    assert "KEDA on lag of iot-pipeline-parse" in notes
    assert "ServiceMonitor iot-pipeline scrapes every stage" in notes


#: A user's own stage, declared in the chart's copy of pipeline.yaml and deployed
#: from its own image (README: "Write your own stage").
USER_STAGE = {
    "config": {
        "topics": {"iot.alerts": {"partitions": 4}, "iot.alert.dlq": {"partitions": 1}},
        "stages": {
            "alert": {
                "uses": "mypkg.alerts:alert",
                "inputs": ["iot.aggregates"],
                "output": "iot.alerts",
                "dlq": "iot.alert.dlq",
                "config": {"threshold": 30},
            }
        },
    },
    "stages": {
        "alert": {"image": {"repository": "registry.example.com/my-alerts", "tag": "1.0"}},
        "alert-canary": {"stage": "alert", "replicas": 1},
    },
}


def test_a_users_stage_gets_its_own_deployment_from_its_own_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(USER_STAGE)

    assert rendered.kinds()["Deployment"] == 6
    (alert,) = rendered.deployment("alert")["spec"]["template"]["spec"]["containers"]
    assert [*alert["command"], *alert["args"]] == ["pipeline", "run", "alert"]
    assert alert["image"] == "registry.example.com/my-alerts:1.0"
    (canary,) = rendered.deployment("alert-canary")["spec"]["template"]["spec"]["containers"]
    assert canary["args"] == ["run", "alert"]
    assert canary["image"].startswith("iot-pipeline:")  # no image of its own: the release's
    (parse,) = rendered.deployment("parse")["spec"]["template"]["spec"]["containers"]
    assert parse["image"].startswith("iot-pipeline:")
    for kind in ("Service", "PodDisruptionBudget"):
        rendered.one(kind, f"{FULLNAME}-alert")
    settings = _settings_of(rendered, "alert", tmp_path, monkeypatch)
    assert settings.stage_ids == ("ingest", "parse", "enrich", "aggregate", "alert")
    assert settings.topology.next_stages("aggregate") == ("alert",)
    assert settings.group_id("alert") == "iot-pipeline-alert"


def test_a_stage_image_by_digest_wins_over_its_tag() -> None:
    digest = "sha256:" + "ab" * 32
    values = {**USER_STAGE, "stages": {"alert": {"image": {"repository": "r/a", "digest": digest}}}}
    (alert,) = render(values).deployment("alert")["spec"]["template"]["spec"]["containers"]
    assert alert["image"] == f"r/a@{digest}"
