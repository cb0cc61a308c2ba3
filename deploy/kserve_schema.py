"""Derive the vendored InferenceService schema from KServe's CustomResourceDefinition.

KServe publishes no installable package with its CRDs (the `kserve` wheel on PyPI is the Python
SDK, without schemas, and pins protobuf<7, which this environment cannot take), so the schema is
vendored: deploy/schemas/README.md says where the CRD came from. What is kept: the v1beta1
openAPIV3Schema with `spec.predictor` (the component we deploy); descriptions, `status` and the
other components (transformer, explainer, canary) are dropped to keep the file small, and an
InferenceService that uses them is refused rather than passed unchecked.

    git show v0.20.0:config/crd/full/serving.kserve.io_inferenceservices.yaml > crd.yaml   # in kserve/kserve
    python -m deploy.kserve_schema crd.yaml --source "kserve/kserve v0.20.0 (1fb7810...)" \
        > deploy/schemas/kserve-v0.20.0-inferenceservice-v1beta1.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

KEPT_COMPONENTS = ("predictor",)


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def derive(crd: dict[str, Any], version: str = "v1beta1") -> dict[str, Any]:
    """The trimmed openAPIV3Schema of one served version of the InferenceService CRD."""
    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != "InferenceService":
        raise ValueError("not the InferenceService CustomResourceDefinition")
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strip(entry["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    spec = schema["properties"]["spec"]
    spec["properties"] = {k: v for k, v in spec["properties"].items() if k in KEPT_COMPONENTS}
    return schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="serving.kserve.io_inferenceservices.yaml (config/crd/full)")
    parser.add_argument("--source", required=True, help="where the CRD came from (repository, tag, commit)")
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    out = {"x-source": args.source, "x-trimmed": "descriptions, status and every component but "
           + ", ".join(KEPT_COMPONENTS) + " removed by deploy/kserve_schema.py", **derive(crd)}
    json.dump(out, sys.stdout, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
