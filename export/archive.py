"""python -m export.archive: an exported model + the handlers package -> MODEL_STORE/xray.mar.

    python -m export.archive [--export-dir artifacts/export] [--model xraynet]
                             [--backend onnxruntime|torchscript] [--model-store model_store]
                             [--batch-size 8] [--max-batch-delay 10] [--min-workers 1] [--max-workers 1]
                             [--response-timeout 60] [--threads 0] [--version V]

The handlers package travels inside the .mar as a directory handlers/ (staged as
STAGE/handlers/*.py and passed as --extra-files STAGE: passing handlers/ itself would flatten it).
model-config.yaml holds TorchServe's batching/worker settings and a `handler:` section
(backend, threads) that handlers/xray_handler.py reads. The archive is built in a temporary
folder, checked, then moved over MODEL_STORE/xray.mar.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from handlers import constants as C
from handlers.backends import ModelFileError, load_runner
from handlers.constants import (
    EXPLAINER_NAME,
    MANIFEST_PATH,
    MODEL_CONFIG_NAME,
    MODEL_NAME,
    MODEL_SUFFIX,
    READINESS_PROBE_NAME,
)
from handlers.schemas import CLASS_NAMES
from handlers.torchserve import read_manifest
from training.sources import default_data_dir, list_image_folder

HANDLERS_DIR = C.REPO_ROOT / "handlers"
HANDLER = HANDLERS_DIR / "xray_handler.py"


class ArchiveError(RuntimeError):
    """Missing inputs or an archive that is not what it should be."""


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"batchSize": args.batch_size, "maxBatchDelay": args.max_batch_delay, "minWorkers": args.min_workers,
            "maxWorkers": args.max_workers, "responseTimeout": args.response_timeout,
            "handler": {"backend": args.backend, "threads": args.threads, "explainer": EXPLAINER_NAME}}


def stage_explainer(stage: Path, export_dir: Path, model: str) -> list[str]:
    """STAGE/explainer.pt: the TorchScript model, which has gradients for Grad-CAM (ONNX has none)."""
    src = export_dir / f"{model}{MODEL_SUFFIX['torchscript']}"
    if not src.is_file():
        raise ArchiveError(f"no {src}: the archive carries the TorchScript model for explanations")
    stage.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, stage / EXPLAINER_NAME)
    return [EXPLAINER_NAME]


def stage_probe(stage: Path, data_dir: Path) -> list[str]:
    """STAGE/readiness_probe: the first PNEUMONIA image of the data's test split (else val, train),
    as its original bytes. The launcher's readiness check and the container's HEALTHCHECK send it
    and require a 200 with a label: a probe the model should refuse (noise) proves nothing."""
    for split in ("test", "val", "train"):
        with contextlib.suppress(FileNotFoundError):
            for path, label in list_image_folder(data_dir, split):
                if CLASS_NAMES[label] == "PNEUMONIA":
                    stage.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, stage / READINESS_PROBE_NAME)
                    return [READINESS_PROBE_NAME]
    raise ArchiveError(f"no radiograph under {data_dir} for the readiness probe (set DATA_DIR or --data-dir)")


def stage_handlers(stage: Path, handlers_dir: Path = HANDLERS_DIR) -> list[str]:
    """STAGE/handlers/*.py (sources only, no __pycache__); returns the archive names."""
    target = stage / "handlers"
    target.mkdir(parents=True)
    names = []
    for src in sorted(handlers_dir.glob("*.py")):
        shutil.copy2(src, target / src.name)
        names.append(f"handlers/{src.name}")
    if "handlers/__init__.py" not in names:
        raise ArchiveError(f"{handlers_dir} is not a package (no __init__.py)")
    return names


def archiver_command() -> list[str]:
    exe = Path(sys.executable).parent / "torch-model-archiver"
    found = str(exe) if exe.is_file() else shutil.which("torch-model-archiver")
    if not found:
        raise ArchiveError("torch-model-archiver not found: install torch-model-archiver (`make setup`)")
    return [found]


def verify(mar: Path, expected: list[str], config: dict[str, Any], model_file: str, version: str) -> dict[str, Any]:
    """The .mar is a zip holding the model, the handlers package, the config and a matching manifest."""
    try:
        with zipfile.ZipFile(mar) as z:
            names = set(z.namelist())
            missing = [n for n in expected if n not in names]
            if missing:
                raise ArchiveError(f"{mar} lacks {missing}")
            packed_config = yaml.safe_load(z.read(MODEL_CONFIG_NAME))
        manifest = read_manifest(mar)
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{mar} is not a zip archive: {exc}") from exc
    model = manifest.get("model", {})
    if model.get("modelName") != MODEL_NAME or model.get("serializedFile") != model_file:
        raise ArchiveError(f"{mar}: unexpected manifest {model}")
    if model.get("modelVersion") != version or packed_config != config:
        raise ArchiveError(f"{mar}: the packed version or {MODEL_CONFIG_NAME} differs from what was asked")
    return manifest


def build(args: argparse.Namespace) -> dict[str, Any]:
    model_path = args.export_dir / f"{args.model}{MODEL_SUFFIX[args.backend]}"
    if not model_path.is_file():
        raise ArchiveError(f"no {model_path}: run `python -m export` first (or pick --model/--backend)")
    if not args.handler.is_file():
        raise ArchiveError(f"handler {args.handler} not found")
    card = load_runner(model_path, args.backend).card  # also proves the file opens and carries its card
    version = args.version or f"{card.version}-{(card.checkpoint_sha256 or 'nosha')[:8]}"
    config = model_config(args)
    args.model_store.mkdir(parents=True, exist_ok=True)
    target = args.model_store / C.MAR_NAME
    with tempfile.TemporaryDirectory(dir=args.model_store, prefix=".archive-") as tmp_name:
        tmp = Path(tmp_name)
        stage, out = tmp / "stage", tmp / "out"
        out.mkdir()
        packed = (stage_handlers(stage, args.handlers_dir) + stage_explainer(stage, args.export_dir, args.model)
                  + stage_probe(stage, args.data_dir))
        (tmp / MODEL_CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [*archiver_command(), "--model-name", MODEL_NAME, "--version", version,
               "--serialized-file", str(model_path), "--handler", str(args.handler),
               "--extra-files", str(stage), "--config-file", str(tmp / MODEL_CONFIG_NAME),
               "--export-path", str(out), "--archive-format", "default", "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ArchiveError(f"torch-model-archiver exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        built = out / C.MAR_NAME
        expected = [model_path.name, MANIFEST_PATH, MODEL_CONFIG_NAME, args.handler.name, *packed]
        verify(built, expected, config, model_path.name, version)
        os.replace(built, target)
    return {"mar": str(target), "model": args.model, "card": card.name, "backend": args.backend,
            "version": version, "file": model_path.name, "bytes": target.stat().st_size, "config": config}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-dir", type=Path, default=C.EXPORT_DIR)
    p.add_argument("--model", default=C.DEFAULT_FAMILY,
                   help="family: xraynet, mlp_bce, mlp_ce (a file in --export-dir)")
    p.add_argument("--backend", choices=sorted(MODEL_SUFFIX), default=C.DEFAULT_BACKEND)
    p.add_argument("--model-store", type=Path, default=C.MODEL_STORE)
    p.add_argument("--data-dir", type=Path, default=None, help="where the readiness probe comes from "
                   "(default: DATA_DIR)")
    # Defaults tuned with `make bench` (see handlers/constants.py and README, "Tuning").
    p.add_argument("--batch-size", type=int, default=C.BATCH_SIZE)
    p.add_argument("--max-batch-delay", type=int, default=C.MAX_BATCH_DELAY_MS, help="ms")
    p.add_argument("--min-workers", type=int, default=C.WORKERS)
    p.add_argument("--max-workers", type=int, default=C.WORKERS)
    p.add_argument("--response-timeout", type=int, default=C.RESPONSE_TIMEOUT_S, help="s")
    p.add_argument("--threads", type=int, default=C.WORKER_THREADS,
                   help="intra-op threads per worker; 0 = the runtime's default")
    p.add_argument("--version", default=None, help="default: card version + short checkpoint sha256")
    p.add_argument("--handler", type=Path, default=HANDLER, help=argparse.SUPPRESS)
    p.add_argument("--handlers-dir", type=Path, default=HANDLERS_DIR, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data_dir = args.data_dir or default_data_dir()
    for name in ("batch_size", "min_workers", "max_workers", "response_timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_batch_delay < 0 or args.threads < 0 or args.max_workers < args.min_workers:
        p.error("--max-batch-delay and --threads must be >= 0, and --max-workers >= --min-workers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        info = build(args)
    except (ArchiveError, ModelFileError) as exc:
        print(f"archive: error: {exc}", file=sys.stderr)
        return 2
    c = info["config"]
    print(f"packed {info['mar']}: model {info['model']} ({info['file']}), backend {info['backend']}, "
          f"version {info['version']}, {info['bytes'] / 1e6:.2f} MB; batchSize {c['batchSize']}, "
          f"maxBatchDelay {c['maxBatchDelay']} ms, workers {c['minWorkers']}-{c['maxWorkers']}, "
          f"threads {c['handler']['threads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
