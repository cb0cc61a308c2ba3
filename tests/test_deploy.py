"""deploy/: the Kubernetes and KServe manifests render, validate offline, and fit together.

Each negative case breaks one thing in a rendered object and requires the validator to name it:
the checks can fail, and they fail for the right reason.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.kustomize import KustomizeError, render, strategic_merge
from deploy.validate import (
    KUBERNETES_VERSIONS,
    TARGETS,
    check_all,
    consistency_problems,
    same_container_problems,
    schema_errors,
)
from tests.helpers import REPO

Obj = dict[str, Any]


def _key(o: Obj) -> tuple[str, str]:
    return o["kind"], o["metadata"]["name"]


def _one(objects: list[Obj], kind: str) -> Obj:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def _container(obj: Obj) -> Obj:
    pod = obj["spec"]["predictor"] if obj["kind"] == "InferenceService" else obj["spec"]["template"]["spec"]
    return pod["containers"][0]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_python_renderer_matches_kubectl_kustomize(target: str) -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed: the Python renderer alone is used")
    out = subprocess.run([kubectl, "kustomize", str(TARGETS[target])], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    theirs = [d for d in yaml.safe_load_all(out) if d]
    assert sorted(render(TARGETS[target]), key=_key) == sorted(theirs, key=_key)


def test_every_object_validates_against_kubernetes_and_kserve_schemas() -> None:
    rendered, problems = check_all(KUBERNETES_VERSIONS)
    assert problems == []
    kinds = {name: sorted(o["kind"] for o in objs) for name, objs in rendered.items()}
    base = sorted(["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "Service",
                   "ServiceAccount"])
    assert kinds == {"cpu": base, "gpu": base, "kserve": ["InferenceService"]}


def test_validation_needs_no_network() -> None:
    """The whole check in a network namespace with no interface up: schemas come from packages."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -n is not permitted here (needs root)")
    r = subprocess.run(["unshare", "-n", sys.executable, "-m", "deploy.validate"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "13 objects in 3 targets: no problems" in r.stdout


def test_gpu_overlay_asks_for_one_gpu_and_cpu_overlay_for_none() -> None:
    cpu, gpu = (_container(_one(render(TARGETS[t]), "Deployment"))["resources"] for t in ("cpu", "gpu"))
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu["limits"] and "nvidia.com/gpu" not in cpu["requests"]
    # the patch merges: what it does not name (ephemeral storage) is kept from the base
    assert gpu["limits"]["ephemeral-storage"] == cpu["limits"]["ephemeral-storage"]
    assert _container(_one(render(TARGETS["gpu"]), "Deployment"))["image"].endswith("-gpu")


def _set(path: str, value: Any) -> Callable[[Obj], None]:
    def edit(obj: Obj) -> None:
        *parents, last = path.split(".")
        node = obj
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


POD = "spec.template.spec"
C0 = f"{POD}.containers.0"


@pytest.mark.parametrize(("kind", "edit", "expected"), [
    ("Deployment", _set("spec.replicas", "two"), "'two' is not of type"),
    ("Deployment", _set(f"{C0}.readinessProbe.exec.comand", ["x"]), "comand"),
    ("Service", _set("spec.ports.0.port", "http"), "'http' is not of type"),
    ("HorizontalPodAutoscaler", _set("spec.metrics.0.resource.target.averageUtilisation", 70),
     "averageUtilisation"),
    ("InferenceService", _set("spec.predictor.minReplicas", "two"), "'two' is not of type"),
    ("InferenceService", _set("spec.predictor.containers.0.resourcez", {}), "resourcez"),
    ("InferenceService", _set("spec.transformer", {"containers": []}), "transformer"),
])
def test_schema_validation_refuses(kind: str, edit: Callable[[Obj], None], expected: str) -> None:
    objects = render(TARGETS["kserve" if kind == "InferenceService" else "cpu"])
    obj = copy.deepcopy(_one(objects, kind))
    assert schema_errors(obj) == []
    edit(obj)
    errors = schema_errors(obj)
    assert errors and expected in " ".join(errors)


@pytest.mark.parametrize(("kind", "edit", "expected"), [
    ("Service", _set("spec.selector", {"app.kubernetes.io/name": "other"}), "selects no pod"),
    ("PodDisruptionBudget", _set("spec.selector.matchLabels", {"app": "x"}), "selects no pod"),
    ("NetworkPolicy", _set("spec.ingress.0.ports.0.port", 8081), "admits port 8081"),
    ("Service", _set("spec.ports.1", {"name": "mgmt", "port": 8081, "targetPort": "http"}), "private port 8081"),
    ("Deployment", _set(f"{C0}.ports.1", {"name": "mgmt", "containerPort": 8081}), "private port 8081"),
    ("Service", _set("spec.ports.0.targetPort", "https"), "targetPort https"),
    ("HorizontalPodAutoscaler", _set("spec.scaleTargetRef.name", "xray"), "scales Deployment/xray"),
    ("Deployment", _set(f"{C0}.securityContext.readOnlyRootFilesystem", False), "not read-only"),
    ("Deployment", _set(f"{POD}.securityContext.runAsUser", 0), "non-root"),
    ("Deployment", _set(f"{C0}.resources.limits", {"cpu": "2"}), "limits lacks ['memory']"),
    ("Deployment", _set(f"{C0}.env.0.value", "/var/lib/xray/token"), "not a file of a mounted Secret"),
    ("Deployment", _set(f"{C0}.env.0.value", "/var/run/secrets/xray/key"), "projects only ['token']"),
    ("Deployment", _set(f"{C0}.volumeMounts.1.name", "stat"), "volumeMount stat has no volume"),
    ("Deployment", _set(f"{C0}.readinessProbe", {"httpGet": {"path": "/ping", "port": 8080}}),
     "readinessProbe must run"),
    ("Deployment", _set(f"{C0}.startupProbe.exec.command", ["python", "/app/docker/health.py"]),
     "the image does not have"),
    ("Deployment", _set(f"{C0}.livenessProbe", {"exec": {"command": ["true"]}}), "livenessProbe must be GET /ping"),
    ("Deployment", _set(f"{POD}.serviceAccountName", "builder"), "ServiceAccount builder"),
])
def test_consistency_check_finds(kind: str, edit: Callable[[Obj], None], expected: str) -> None:
    objects = copy.deepcopy(render(TARGETS["cpu"]))
    assert consistency_problems(objects) == []
    edit(_one(objects, kind))
    problems = consistency_problems(objects)
    assert problems and expected in " ".join(problems), problems


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("spec.predictor.containers.0.resources.limits.memory", "1Gi", "container resources differs"),
    ("spec.predictor.containers.0.env.0.value", "/tmp/token", "container env differs"),
    ("spec.predictor.containers.0.ports.0.containerPort", 8082, "routes port 8082"),
    ("spec.predictor.securityContext.runAsUser", 1000, "pod securityContext differs"),
])
def test_inference_service_runs_the_deployments_container(path: str, value: Any, expected: str) -> None:
    deployment = _one(render(TARGETS["cpu"]), "Deployment")
    isvc = _one(render(TARGETS["kserve"]), "InferenceService")
    assert same_container_problems(isvc, deployment) == []
    _set(path, value)(isvc)
    assert expected in " ".join(same_container_problems(isvc, deployment))


def test_renderer_refuses_what_it_cannot_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{TARGETS['cpu'] / '../../base'}]\npatches:\n  - patch: |\n"
        "      kind: Deployment\n      metadata: {name: nope}\n      spec: {replicas: 3}\n")
    with pytest.raises(KustomizeError, match="Deployment/nope matches 0 objects"):
        render(tmp_path)


def test_strategic_merge_merges_named_lists_and_deletes_nulls() -> None:
    base = {"containers": [{"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}]}, {"name": "b"}],
            "args": ["1", "2"], "nodeSelector": {"zone": "a"}}
    patch = {"containers": [{"name": "a", "env": [{"name": "L", "value": "2"}]}, {"name": "c"}],
             "args": ["3"], "nodeSelector": None}
    assert strategic_merge(base, patch) == {
        "containers": [{"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}, {"name": "L", "value": "2"}]},
                       {"name": "b"}, {"name": "c"}],
        "args": ["3"]}
    assert base["nodeSelector"] == {"zone": "a"}  # inputs untouched
