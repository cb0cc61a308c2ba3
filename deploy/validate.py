"""Validate deploy/ offline: render every target, check every object against a schema, check
that the objects agree with each other and with the container.

- Kubernetes objects: the OpenAPI schema of Kubernetes KUBERNETES_VERSION, strict (an unknown
  field is an error, as `kubectl apply --validate=strict` makes it), from the schemas that the
  kubernetes-validate package ships: no cluster, no network.
- The InferenceService: KServe's CRD schema (deploy/schemas/, see its README), strict in the same
  way (the API server would silently prune an unknown field; here it is an error). CEL rules
  (x-kubernetes-validations) are not evaluated.
- Consistency (what no schema sees): selectors match the pod labels, the HPA targets the
  Deployment, Service and NetworkPolicy ports are container ports, TorchServe's management and
  gRPC ports are exposed nowhere, non-root with a read-only root filesystem and resource
  requests/limits, every mount has its volume, XRAY_TOKEN_FILE lies in the mounted Secret,
  exec probes run a script that the image has, and the InferenceService's container is the
  Deployment's.

    python -m deploy.validate        # make deploy-check; exit 1 on any problem
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate

from deploy.kustomize import render
from handlers import constants as C

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
# The oldest Kubernetes the manifests are for (KServe 0.20 needs 1.32+); the suite also checks
# the newest schema that kubernetes-validate ships, to see removals coming.
KUBERNETES_VERSION = "1.33.0"
KUBERNETES_VERSIONS = (KUBERNETES_VERSION, kubernetes_validate.utils.latest_version())
KSERVE_SCHEMA = DEPLOY / "schemas" / "kserve-v0.20.0-inferenceservice-v1beta1.json"
TARGETS = {"cpu": DEPLOY / "overlays" / "cpu", "gpu": DEPLOY / "overlays" / "gpu", "kserve": DEPLOY / "kserve"}
# The image's layout: /app is the repository's packages and docker/ scripts.
IMAGE_APP_DIR = PurePosixPath("/app")
TOKEN_ENV = "XRAY_TOKEN_FILE"

Obj = dict[str, Any]


# TorchServe's default management port: ours listens on a unix socket inside the container, and
# no manifest may open the port where a TorchServe left to its defaults would answer.
TORCHSERVE_MANAGEMENT_PORT = 8081


def _private_ports() -> set[int]:
    """TorchServe's management API and gRPC: never exposed outside the pod."""
    return {TORCHSERVE_MANAGEMENT_PORT, C.GRPC_INFERENCE_PORT, C.GRPC_MANAGEMENT_PORT}


@cache
def kserve_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(KSERVE_SCHEMA.read_text())
    return jsonschema.Draft4Validator(_closed(schema))


def _closed(node: Any) -> Any:
    """The schema with every object that lists its properties closed to others."""
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


def _where(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_errors(obj: Obj, version: str = KUBERNETES_VERSION) -> list[str]:
    """Problems of one object against its schema (Kubernetes, or KServe's for an InferenceService)."""
    if obj.get("apiVersion", "").startswith("serving.kserve.io/"):
        errors = sorted(kserve_validator().iter_errors(obj), key=lambda e: list(e.absolute_path))
        return [f"{_where(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, e.path)) or "<root>"
        return [f"{_where(obj)}: {path}: {e.message} (Kubernetes {e.version})"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{_where(obj)}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {version}"]
    return []


def _pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"]
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
        return obj["spec"]["template"]["spec"]
    return None


def _matches(selector: Obj, labels: Obj) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_problems(where: str, pod: Obj) -> list[str]:
    """Security, resources, volumes, token file and probes of one pod spec."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod.get("containers", []):
        at = f"{where} container {c['name']}"
        sc = {**pod_sc, **c.get("securityContext", {})}
        if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", 0) == 0:
            problems.append(f"{at}: must run as a non-root user (runAsNonRoot, runAsUser != 0)")
        if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: root filesystem is not read-only")
        if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(c.get("resources", {}).get(kind, {}))
            if missing:
                problems.append(f"{at}: resources.{kind} lacks {sorted(missing)}")
        for port in c.get("ports", []):
            if port["containerPort"] in _private_ports():
                problems.append(f"{at}: exposes private port {port['containerPort']}")
        mounts = {}
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problems.append(f"{at}: volumeMount {m['name']} has no volume")
            mounts[PurePosixPath(m["mountPath"])] = m
        problems += _token_problems(at, c, mounts, volumes)
        problems += _probe_problems(at, c)
    return problems


def _token_problems(at: str, c: Obj, mounts: dict[PurePosixPath, Obj], volumes: dict[str, Obj]) -> list[str]:
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if TOKEN_ENV not in env:
        return [f"{at}: no {TOKEN_ENV}: replicas would not share one token"]
    token = PurePosixPath(env[TOKEN_ENV])
    for path, m in mounts.items():
        secret = volumes.get(m["name"], {}).get("secret")
        if secret and token.parent == path:
            paths = [i["path"] for i in secret.get("items", [])] or None
            if paths is not None and token.name not in paths:
                return [f"{at}: {TOKEN_ENV}={token} but the Secret projects only {paths}"]
            return []
    return [f"{at}: {TOKEN_ENV}={token} is not a file of a mounted Secret"]


def _probe_problems(at: str, c: Obj) -> list[str]:
    problems = []
    for name in ("startupProbe", "readinessProbe"):
        probe = c.get(name)
        if not probe or "exec" not in probe:
            problems.append(f"{at}: {name} must run the image's readiness check (a real prediction)")
            continue
        scripts = [a for a in probe["exec"]["command"] if a.startswith(f"{IMAGE_APP_DIR}/")]
        for script in scripts:
            if not (REPO / PurePosixPath(script).relative_to(IMAGE_APP_DIR)).is_file():
                problems.append(f"{at}: {name} runs {script}, which the image does not have")
        if not scripts:
            problems.append(f"{at}: {name} runs no script of the image: {probe['exec']['command']}")
    live = c.get("livenessProbe", {}).get("httpGet")
    if not live or live.get("path") != "/ping":
        problems.append(f"{at}: livenessProbe must be GET /ping (the server, not the model)")
    return problems


def consistency_problems(objects: Iterable[Obj]) -> list[str]:
    """What the schemas cannot see: how the rendered objects of one target fit together."""
    objects = list(objects)
    by_kind: dict[str, list[Obj]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    problems = []
    accounts = {o["metadata"]["name"] for o in by_kind.get("ServiceAccount", [])}
    for o in objects:
        pod = _pod_spec(o)
        if pod is not None:
            problems += pod_problems(_where(o), pod)
            if pod.get("serviceAccountName", "default") not in accounts | {"default"}:
                problems.append(f"{_where(o)}: ServiceAccount {pod['serviceAccountName']} is not in this target")
    for d in by_kind.get("Deployment", []):
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        ports = {p.get("name"): p["containerPort"] for c in d["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        if not _matches(d["spec"]["selector"].get("matchLabels", {}), labels):
            problems.append(f"{_where(d)}: selector does not match its pod labels")
        for s in by_kind.get("Service", []):
            if not _matches(s["spec"].get("selector", {}), labels):
                problems.append(f"{_where(s)}: selector selects no pod of {_where(d)}")
            for p in s["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                if (target not in ports) if isinstance(target, str) else (target not in ports.values()):
                    problems.append(f"{_where(s)}: targetPort {target} is no container port of {_where(d)}")
                if p["port"] in _private_ports():
                    problems.append(f"{_where(s)}: exposes private port {p['port']}")
        for pdb in by_kind.get("PodDisruptionBudget", []):
            if not _matches(pdb["spec"]["selector"].get("matchLabels", {}), labels):
                problems.append(f"{_where(pdb)}: selector selects no pod of {_where(d)}")
        for np in by_kind.get("NetworkPolicy", []):
            if not _matches(np["spec"]["podSelector"].get("matchLabels", {}), labels):
                problems.append(f"{_where(np)}: podSelector selects no pod of {_where(d)}")
            for rule in np["spec"].get("ingress", []):
                for p in rule.get("ports", []):
                    if p["port"] in _private_ports() or p["port"] not in ports.values():
                        problems.append(f"{_where(np)}: admits port {p['port']}, not a public container port")
        for hpa in by_kind.get("HorizontalPodAutoscaler", []):
            ref = hpa["spec"]["scaleTargetRef"]
            if (ref["kind"], ref["name"]) != ("Deployment", d["metadata"]["name"]):
                problems.append(f"{_where(hpa)}: scales {ref['kind']}/{ref['name']}, not {_where(d)}")
    return problems


def same_container_problems(isvc: Obj, deployment: Obj) -> list[str]:
    """The InferenceService must run the Deployment's container and pod settings (one truth)."""
    pod = deployment["spec"]["template"]["spec"]
    pred = isvc["spec"]["predictor"]
    problems = []
    (dc,) = pod["containers"]
    (kc,) = pred["containers"]
    # KServe routes one port and names its container itself; the image tag is the overlay's.
    ignore = {"name", "ports", "image"}
    for key in sorted((set(dc) | set(kc)) - ignore):
        if dc.get(key) != kc.get(key):
            problems.append(f"{_where(isvc)}: container {key} differs from {_where(deployment)}")
    if kc["image"].split(":")[0] != dc["image"].split(":")[0]:
        problems.append(f"{_where(isvc)}: image {kc['image']} is not {dc['image']}")
    if [kc["ports"][0]["containerPort"]] != [p["containerPort"] for p in dc["ports"]][:1]:
        problems.append(f"{_where(isvc)}: routes port {kc['ports'][0]['containerPort']}, not the inference port")
    for key in ("securityContext", "volumes", "automountServiceAccountToken", "terminationGracePeriodSeconds"):
        if pod.get(key) != pred.get(key):
            problems.append(f"{_where(isvc)}: pod {key} differs from {_where(deployment)}")
    return problems


def check_all(versions: Iterable[str] = (KUBERNETES_VERSION,)) -> tuple[dict[str, list[Obj]], list[str]]:
    """Render every target and collect every problem."""
    rendered = {name: render(path) for name, path in TARGETS.items()}
    problems = []
    for name, objects in rendered.items():
        for version in versions:
            problems += [f"[{name}] {p}" for p in (e for o in objects for e in schema_errors(o, version))]
        problems += [f"[{name}] {p}" for p in consistency_problems(objects)]
    (deployment,) = [o for o in rendered["cpu"] if o["kind"] == "Deployment"]
    for isvc in (o for o in rendered["kserve"] if o["kind"] == "InferenceService"):
        problems += [f"[kserve] {p}" for p in same_container_problems(isvc, copy.deepcopy(deployment))]
    return rendered, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes", nargs="+", default=list(KUBERNETES_VERSIONS),
                        help=f"Kubernetes schema versions (default: {' '.join(KUBERNETES_VERSIONS)})")
    args = parser.parse_args(argv)
    rendered, problems = check_all(args.kubernetes)
    print(f"{'target':8} {'kind':26} {'name':12} schema")
    for name, objects in rendered.items():
        for o in objects:
            schema = (f"KServe {KSERVE_SCHEMA.stem.split('-')[1]} CRD" if o["kind"] == "InferenceService"
                      else "Kubernetes " + ", ".join(v.rsplit(".", 1)[0] for v in args.kubernetes))
            print(f"{name:8} {o['kind']:26} {o['metadata']['name']:12} {schema}")
    for p in problems:
        print("PROBLEM", p)
    n = sum(map(len, rendered.values()))
    print(f"{n} objects in {len(rendered)} targets: {'no problems' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
