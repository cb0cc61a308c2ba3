"""Shared fixtures: the data folder, and the pipeline a user runs (train -> export -> archive).

Images come from DATA_DIR (../shared/data/chest_xray) when present, otherwise from a small
generated ImageFolder tree. The pipeline fixtures call the same CLIs as the Makefile, in
CI-sized ("--quick") form, into a temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from handlers.constants import DATA_DIR as SHARED_DATA
from serving import launcher
from serving.settings import ServeSettings
from tests.helpers import make_image_folder, run_cli, serve_settings


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("DATA_DIR")
    if env and (Path(env) / "test").is_dir():
        return Path(env)
    if (SHARED_DATA / "test").is_dir():
        return SHARED_DATA
    root = tmp_path_factory.mktemp("synthetic_chest_xray")
    return make_image_folder(root, {"train": (60, 120), "val": (20, 40), "test": (40, 80)})


@pytest.fixture(scope="session")
def sample_jpeg(data_dir: Path) -> bytes:
    return next((data_dir / "test" / "PNEUMONIA").glob("*.jp*g")).read_bytes()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def best_dir(workdir: Path, data_dir: Path) -> Path:
    """`make train`, CI-sized: the default set in --quick form -> best checkpoints + summary.json."""
    out = workdir / "best"
    run_cli("training.experiments", "--study", "default", "--quick", "--data-dir", str(data_dir),
            "--runs-dir", str(workdir / "runs"), "--best-dir", str(out),
            "--reports-dir", str(workdir / "reports"))
    return out


@pytest.fixture(scope="session")
def export_dir(workdir: Path, best_dir: Path, data_dir: Path) -> Path:
    """`make export`: TorchScript + ONNX per best checkpoint, parity report, offline predictions."""
    out = workdir / "export"
    run_cli("export", "--best-dir", str(best_dir), "--out-dir", str(out), "--data-dir", str(data_dir))
    return out


@pytest.fixture(scope="session")
def model_store(workdir: Path, export_dir: Path, data_dir: Path) -> Path:
    """`make archive`: model_store/xray.mar (best CNN, ONNX Runtime backend)."""
    out = workdir / "model_store"
    # A longer batch delay than the default so that concurrent test requests share a batch.
    run_cli("export.archive", "--export-dir", str(export_dir), "--model-store", str(out),
            "--max-batch-delay", "50", "--data-dir", str(data_dir))
    return out


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[ServeSettings]:
    """A real TorchServe on free loopback ports, serving the test archive; stopped at the end."""
    settings = serve_settings(tmp_path_factory.mktemp("server"), model_store).resolved()
    launcher.start(settings, timeout=300)
    try:
        yield settings
    finally:
        launcher.stop(settings)


# Fixtures that train (the CI-sized pipeline, test_training's tiny runs) or start a server.
PIPELINE_FIXTURES = {"best_dir", "export_dir", "model_store", "server", "tiny_data", "tiny_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that trains or serves, so `make test-fast` can leave them out."""
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pipeline)
