"""export.archive: model_store/xray.mar holds the model, the handlers package as handlers/, the config."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from export.archive import main as archive_main
from export.archive import model_config, parse_args
from handlers import constants as C
from handlers.backends import load_runner
from handlers.constants import REPO_ROOT as REPO
from handlers.torchserve import read_manifest, read_model_config

HANDLER_MODULES = sorted(p.name for p in (REPO / "handlers").glob("*.py"))
DEFAULT_CONFIG = {"batchSize": C.BATCH_SIZE, "maxBatchDelay": C.MAX_BATCH_DELAY_MS, "minWorkers": C.WORKERS,
                  "maxWorkers": C.WORKERS, "responseTimeout": C.RESPONSE_TIMEOUT_S,
                  "handler": {"backend": C.DEFAULT_BACKEND, "threads": C.WORKER_THREADS,
                              "explainer": C.EXPLAINER_NAME}}


def read_mar(mar: Path) -> tuple[set[str], dict, dict]:
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
    return names, read_manifest(mar), read_model_config(mar)


def test_default_mar_entries_and_config(model_store: Path, export_dir: Path) -> None:
    mar = model_store / C.MAR_NAME
    assert [p.name for p in model_store.iterdir()] == [C.MAR_NAME], "no temporary leftovers"
    names, manifest, config = read_mar(mar)
    for module in ("__init__.py", "preprocess.py", "schemas.py", "backends.py", "xray_handler.py"):
        assert f"handlers/{module}" in names
    assert {n for n in names if n.startswith("handlers/")} == {f"handlers/{m}" for m in HANDLER_MODULES}
    assert "preprocess.py" not in names, "handlers/ was flattened into the archive root"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert {"xraynet.onnx", C.MANIFEST_PATH, C.MODEL_CONFIG_NAME, "xray_handler.py", C.EXPLAINER_NAME} <= names
    model = manifest["model"]
    assert model["modelName"] == C.MODEL_NAME and model["serializedFile"] == "xraynet.onnx"
    assert model["handler"] == "xray_handler.py" and model["configFile"] == C.MODEL_CONFIG_NAME
    card = load_runner(export_dir / "xraynet.onnx").card
    assert model["modelVersion"] == f"{card.version}-{card.checkpoint_sha256[:8]}"
    assert config == DEFAULT_CONFIG | {"maxBatchDelay": 50}  # conftest's model_store passes --max-batch-delay 50
    with zipfile.ZipFile(mar) as z:
        assert z.read("xraynet.onnx") == (export_dir / "xraynet.onnx").read_bytes()
        assert z.read("handlers/preprocess.py") == (REPO / "handlers" / "preprocess.py").read_bytes()


def test_packed_handlers_import_from_the_archive(model_store: Path, tmp_path: Path) -> None:
    """As a TorchServe worker does: the unpacked model dir on sys.path, `import handlers.x` from it."""
    with zipfile.ZipFile(model_store / C.MAR_NAME) as z:
        z.extractall(tmp_path)
    code = ("import sys; sys.path.insert(0, '.'); sys.path.remove(sys.argv[1]) if sys.argv[1] in sys.path else 0\n"
            "import handlers, handlers.preprocess, handlers.backends\n"
            "print(handlers.__file__); print(handlers.backends.load_runner('xraynet.onnx').card.name)")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    module_file, card_name = proc.stdout.split()
    assert Path(module_file).resolve().is_relative_to(tmp_path.resolve())
    assert card_name


def test_default_options() -> None:
    assert model_config(parse_args([])) == DEFAULT_CONFIG


def test_torchscript_backend_and_options(export_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    argv = ["--export-dir", str(export_dir), "--model-store", str(store), "--backend", "torchscript",
            "--batch-size", "4", "--max-batch-delay", "25", "--min-workers", "1", "--max-workers", "2",
            "--response-timeout", "30", "--threads", "2", "--version", "2.0"]
    assert archive_main(argv) == 0
    first = (store / C.MAR_NAME).stat().st_mtime_ns
    assert archive_main(argv) == 0, "an existing archive is replaced"
    assert (store / C.MAR_NAME).stat().st_mtime_ns >= first
    out = capsys.readouterr().out
    assert "torchscript" in out and "2.0" in out and "xraynet" in out
    names, manifest, config = read_mar(store / C.MAR_NAME)
    assert "xraynet.torchscript.pt" in names and "xraynet.onnx" not in names
    assert manifest["model"]["serializedFile"] == "xraynet.torchscript.pt"
    assert manifest["model"]["modelVersion"] == "2.0"
    assert config == {"batchSize": 4, "maxBatchDelay": 25, "minWorkers": 1, "maxWorkers": 2, "responseTimeout": 30,
                      "handler": {"backend": "torchscript", "threads": 2, "explainer": C.EXPLAINER_NAME}}


def test_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = archive_main(["--export-dir", str(tmp_path / "nothing"), "--model-store", str(tmp_path / "store")])
    assert rc == 2
    assert "python -m export" in capsys.readouterr().err
    assert not (tmp_path / "store" / C.MAR_NAME).exists()
