"""handlers.constants (one home for the deployment's constants) and handlers.torchserve (TorchServe's formats)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from handlers import constants as C
from handlers.torchserve import is_ready, read_manifest, read_model_config
from serving.settings import ServeSettings


def run_constants(*names: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "handlers.constants", *names], cwd=C.REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_shell_reads_the_same_values_as_python() -> None:
    out = run_constants("MODEL_NAME", "INFERENCE_PORT", "METRICS_URL", "MODEL_STORE")
    assert out.returncode == 0, out.stderr
    s = ServeSettings().resolved()
    assert out.stdout.split() == [C.MODEL_NAME, str(s.inference_port), s.metrics_url, str(s.model_store)]
    bad = run_constants("NO_SUCH_NAME")
    assert bad.returncode == 2 and "NO_SUCH_NAME" in bad.stderr


def test_constants_import_neither_torch_nor_numpy() -> None:
    # the container's health check and the Makefile import it before anything heavy
    code = "import sys, handlers.constants, handlers.torchserve; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=C.REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_is_ready_needs_a_ready_worker() -> None:
    assert is_ready([{"status": "UNLOADING"}, {"status": "READY"}])
    assert not is_ready([{"status": "UNLOADING"}, {}])
    assert not is_ready([])


def test_manifest_and_config_read_from_a_mar(tmp_path: Path) -> None:
    mar = tmp_path / C.MAR_NAME
    with zipfile.ZipFile(mar, "w") as z:
        z.writestr(C.MANIFEST_PATH, json.dumps({"model": {"modelName": C.MODEL_NAME, "serializedFile": "m.onnx",
                                                          "configFile": C.MODEL_CONFIG_NAME}}))
        z.writestr(C.MODEL_CONFIG_NAME, "batchSize: 4\nmaxBatchDelay: 7\n")
    assert read_manifest(mar)["model"]["serializedFile"] == "m.onnx"
    assert read_model_config(mar) == {"batchSize": 4, "maxBatchDelay": 7}
    bare = tmp_path / "bare.mar"
    with zipfile.ZipFile(bare, "w") as z:
        z.writestr(C.MANIFEST_PATH, json.dumps({"model": {"modelName": "x"}}))
    assert read_model_config(bare) == {}
