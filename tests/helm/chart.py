"""Render ``helm/pipeline`` with the real Helm engine, offline, and look into the result.

The engine is Helm's own Go SDK (v4.2.3) running in-process through
``helm-python-sdk``: the same template functions, values coalescing and
``values.schema.json`` validation as ``helm template``/``helm install``. Nothing
contacts a cluster or the network.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "pipeline"
RELEASE = "iot"
NAMESPACE = "data"
FULLNAME = "iot-pipeline"  # release "iot" + chart "pipeline"
STAGE_IDS = ("ingest", "parse", "enrich", "aggregate")

Obj = dict[str, Any]

#: Kafka over SASL_SSL with SCRAM and a private CA, all from one existing Secret.
SASL_VALUES: Obj = {
    "kafka": {
        "bootstrapServers": "b-1.kafka.internal:9096,b-2.kafka.internal:9096",
        "securityProtocol": "SASL_SSL",
        "saslMechanism": "SCRAM-SHA-512",
        "existingSecret": "kafka-credentials",
        "secretKeys": {"caCert": "ca.crt"},
    }
}

#: Every optional feature at once (KEDA autoscaling on every stage).
EVERYTHING: Obj = {
    **SASL_VALUES,
    "stages": {
        "ingest": {"autoscaling": {"enabled": True}},
        "parse": {"autoscaling": {"enabled": True, "minReplicas": 2}},
        "enrich": {"autoscaling": {"enabled": True}},
        "aggregate": {"autoscaling": {"enabled": True, "maxReplicas": 2}},
        "parse-canary": {"stage": "parse", "replicas": 1, "env": {"PIPELINE_LOG_LEVEL": "debug"}},
    },
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    # KEDA also scales on lag in seconds, read from this Prometheus
    "autoscaling": {"keda": {"prometheus": {"serverAddress": "http://prometheus:9090"}}},
    "grafanaDashboard": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "backfill": {
        "enabled": True,
        "runId": "2024-06-replay",
        "fromParquet": "/data/readings.parquet",
        "rate": 500,
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "backfill-data"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
    },
}

#: The same, with the HPA fallback instead of KEDA.
EVERYTHING_HPA: Obj = {**EVERYTHING, "autoscaling": {"keda": {"enabled": False}}}

#: Lets ``render`` say the cluster serves the Prometheus Operator's API.
MONITORING_API = ("monitoring.coreos.com/v1",)


@functools.cache
def chart() -> helm.Chart:
    """The chart, loaded once per test session."""
    return helm.Chart.load(CHART_DIR)


@dataclass(frozen=True)
class Rendered:
    """The manifests of one render: Kubernetes objects, and NOTES.txt apart."""

    objects: tuple[Obj, ...]
    notes: str
    text: str

    def kinds(self) -> Counter[str]:
        return Counter(o["kind"] for o in self.objects)

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> Obj:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
        return found[0]

    def deployment(self, key: str) -> Obj:
        return self.one("Deployment", f"{FULLNAME}-{key}")

    def names(self, kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.of_kind(kind)}


def render(values: Obj | None = None, *, api_versions: Sequence[str] = ()) -> Rendered:
    """``helm template iot helm/pipeline -n data [--api-versions ...] -f values``.

    Raises ``helm.HelmValuesError`` when the schema rejects the values and
    ``helm.HelmRenderError`` when a template fails (``fail``/``required``).
    """
    opts: Obj = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True}
    if api_versions:
        opts["api_versions"] = list(api_versions)
    # Chart.render() has no api_versions option; the native call it wraps does.
    raw = _native.call_string(
        "helm_render", chart()._raw(), json.dumps(values or {}), json.dumps(opts)
    )
    manifests: dict[str, str] = json.loads(raw)
    objects: list[Obj] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    text = "\n---\n".join(t for p, t in sorted(manifests.items()) if not p.endswith("NOTES.txt"))
    return Rendered(tuple(objects), notes, text)


def merged(*layers: Obj) -> Obj:
    """Deep-merge value layers like repeated ``-f`` files (later wins)."""
    out: Obj = {}
    for layer in layers:
        _merge_into(out, copy.deepcopy(layer))
    return out


def _merge_into(dst: Obj, src: Obj) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(dst[key], value)
        else:
            dst[key] = value


def pod_templates(rendered: Rendered) -> Iterator[tuple[str, Obj]]:
    """(kind/name, pod template) of every workload object rendered."""
    for obj in rendered.objects:
        spec = obj.get("spec", {})
        if obj["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec and obj["kind"] in {
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "ReplicaSet",
            "Job",
            "CronJob",
        }:
            yield f"{obj['kind']}/{obj['metadata']['name']}", spec["template"]


def containers(pod_template: Obj) -> list[Obj]:
    spec = pod_template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: Obj) -> dict[str, Obj]:
    """The container's env entries by name; fails on a duplicate name."""
    names = [e["name"] for e in container.get("env", [])]
    duplicates = [n for n, c in Counter(names).items() if c > 1]
    assert not duplicates, f"duplicate env names {duplicates}"
    return {e["name"]: e for e in container.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|API_KEY", re.IGNORECASE)
