"""Render a kustomization the way `kubectl kustomize` does, for the subset deploy/ uses.

kubectl is not on every machine that runs the suite, so this renders deploy/ with PyYAML alone.
Supported: `resources` (files and directories holding a kustomization.yaml), `namespace`,
`images` (name -> newName / newTag / digest) and `patches` as strategic-merge patches (from
`path` or inline `patch`, target taken from the patch's kind and name, or from `target`). Any
other key is refused, never silently ignored. Strategic merge here: maps merge key by key, lists
of objects that all carry a `name` merge by name, other lists are replaced, `null` deletes. Where
kubectl exists, tests/test_deploy.py checks that both render the same objects.

    python -m deploy.kustomize deploy/overlays/cpu > rendered.yaml
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# Kinds that have no namespace: the namespace transformer leaves them alone.
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
    "StorageClass", "PriorityClass", "IngressClass", "RuntimeClass", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration", "APIService", "ClusterServingRuntime",
}

Obj = dict[str, Any]


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render faithfully, or one that is wrong."""


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _load_documents(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise KustomizeError(f"{path}: not a Kubernetes object: {str(d)[:80]}")
    return docs


def strategic_merge(base: Any, patch: Any) -> Any:
    """`patch` applied onto `base` (both left untouched): the subset of strategic merge above."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if "$patch" in patch:
            raise KustomizeError("$patch directives are not supported")
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        out = copy.deepcopy(base)
        index = {item["name"]: i for i, item in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = strategic_merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _containers(node: Any) -> Iterator[Obj]:
    """Every container of an object, wherever its PodSpec sits (Deployment, InferenceService, ...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    # A tag follows the last ':' unless that ':' belongs to a registry's port (a '/' comes after).
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


def set_images(objects: list[Obj], images: list[Obj]) -> None:
    for rule in images:
        for container in (c for obj in objects for c in _containers(obj)):
            image = container.get("image")
            if not isinstance(image, str) or _image_name(image) != rule["name"]:
                continue
            name = rule.get("newName", rule["name"])
            if "digest" in rule:
                container["image"] = f"{name}@{rule['digest']}"
            elif "newTag" in rule:
                container["image"] = f"{name}:{rule['newTag']}"
            else:  # only the name changes: keep the tag or digest it had
                container["image"] = name + image[len(_image_name(image)):]


def _apply_patch(objects: list[Obj], patch: Obj, target: Obj | None, where: str) -> None:
    kind = (target or {}).get("kind", patch.get("kind"))
    name = (target or {}).get("name", patch.get("metadata", {}).get("name"))
    hits = [i for i, o in enumerate(objects) if o["kind"] == kind and o["metadata"].get("name") == name]
    if len(hits) != 1:
        raise KustomizeError(f"{where}: patch for {kind}/{name} matches {len(hits)} objects")
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
    merged = strategic_merge(objects[hits[0]], body)
    extra_meta = {k: v for k, v in patch.get("metadata", {}).items() if k != "name"}
    merged["metadata"] = strategic_merge(merged["metadata"], extra_meta)
    objects[hits[0]] = merged


def render(directory: Path | str) -> list[Obj]:
    """The objects that `kubectl kustomize directory` prints, in resource order."""
    directory = Path(directory)
    kfile = _kustomization_file(directory)
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported keys {sorted(unknown)}")

    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objects.extend(render(path) if path.is_dir() else _load_documents(path))

    for i, item in enumerate(spec.get("patches", [])):
        where = f"{kfile}: patches[{i}]"
        if "path" in item:
            docs = _load_documents(directory / item["path"])
        elif "patch" in item:
            docs = [d for d in yaml.safe_load_all(item["patch"]) if d is not None]
        else:
            raise KustomizeError(f"{where}: needs path or patch")
        if any(isinstance(d, list) for d in docs):
            raise KustomizeError(f"{where}: JSON 6902 patches are not supported")
        for doc in docs:
            _apply_patch(objects, doc, item.get("target"), where)

    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    set_images(objects, spec.get("images", []))
    return objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a folder with a kustomization.yaml")
    args = parser.parse_args(argv)
    yaml.safe_dump_all(render(args.directory), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
