"""Every pod the chart can render — stage Deployments, the topics hook Job, the
backfill Job — meets the restricted Pod Security Standard."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helm.chart import (
    EVERYTHING,
    EVERYTHING_HPA,
    MONITORING_API,
    containers,
    pod_templates,
    render,
)

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything-keda": EVERYTHING,
    "everything-hpa": EVERYTHING_HPA,
    "openshift-uids": {
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}
    },
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_pod_template_is_restricted(values: dict[str, Any]) -> None:
    rendered = render(values, api_versions=MONITORING_API)
    templates = list(pod_templates(rendered))
    kinds = {where.split("/")[0] for where, _ in templates}
    assert "Deployment" in kinds
    assert "Job" in kinds  # the topics hook, in every value set

    for where, pod in templates:
        spec = pod["spec"]
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert security.get("runAsUser", 1) != 0, where
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["enableServiceLinks"] is False, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{where}: {key}"
        assert all("hostPath" not in v for v in spec["volumes"]), where
        # The root filesystem is read-only: /tmp (Faust's data dir) is an emptyDir.
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in containers(pod):
            name = f"{where}/{container['name']}"
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"] == {"drop": ["ALL"]}, name
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert not ctx.get("privileged"), name
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1, name
            assert tmp[0]["name"] in empty_dirs, name
            assert "resources" in container, name


def test_the_image_user_is_the_default_pod_user() -> None:
    """The Dockerfile's numeric USER and the chart's default runAsUser agree."""
    (_, pod), *_ = pod_templates(render())
    security = pod["spec"]["securityContext"]

    assert (security["runAsUser"], security["runAsGroup"]) == (10001, 10001)
