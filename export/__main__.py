"""python -m export: every best checkpoint -> TorchScript + ONNX, parity on real test images.

    python -m export [--best-dir artifacts/best] [--out-dir artifacts/export] [--data-dir D]
                     [--parity-images N]

Reads BEST/summary.json ({"models": {family: {"checkpoint": "family.pt", ...}}}) and writes, per
family, OUT/family.onnx, OUT/family.torchscript.pt and OUT/predictions_family.json, then
OUT/parity.json. Exits 1 when a model fails parity, 2 when the inputs are missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from export import parity
from export.cards import export_card
from export.onnx_export import export_onnx
from export.torchscript import export_torchscript
from handlers.constants import BEST_DIR, EXPORT_DIR
from training.checkpoint import load_checkpoint
from training.sources import default_data_dir

DEFAULT_BEST = BEST_DIR
DEFAULT_OUT = EXPORT_DIR


class ExportError(RuntimeError):
    """Missing or malformed inputs: reported as one clear line, exit status 2."""


def read_summary(best_dir: Path) -> dict[str, Path]:
    """BEST/summary.json -> {family: checkpoint path}, every checkpoint checked to exist."""
    summary_path = best_dir / "summary.json"
    if not summary_path.is_file():
        raise ExportError(f"no {summary_path}: train first (`make train`) or pass --best-dir")
    try:
        models = json.loads(summary_path.read_text())["models"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{summary_path} is not a best-models summary ({{'models': {{...}}}}): {exc}") from exc
    if not models:
        raise ExportError(f"{summary_path} lists no models")
    found = {}
    for family, entry in sorted(models.items()):
        path = best_dir / entry["checkpoint"]
        if not path.is_file():
            raise ExportError(f"{summary_path}: checkpoint of '{family}' not found at {path}")
        found[family] = path
    return found


def export_family(family: str, checkpoint: Path, out_dir: Path, images: parity.Images) -> dict[str, Any]:
    card, model, _ = load_checkpoint(checkpoint)
    card = export_card(card, checkpoint)
    onnx_path = export_onnx(model, card, out_dir / f"{family}.onnx")
    ts_path = export_torchscript(model, card, out_dir / f"{family}.torchscript.pt")
    report, prob = parity.check_model(model, card, onnx_path, ts_path, images)
    report |= {"checkpoint": str(checkpoint), "checkpoint_sha256": card.checkpoint_sha256,
               "onnx": onnx_path.name, "torchscript": ts_path.name}
    preds = parity.predictions(family, card, images, prob)
    (out_dir / f"predictions_{family}.json").write_text(json.dumps(preds, indent=1))
    return report


def run(best_dir: Path, out_dir: Path, data_dir: Path, n_images: int | None) -> dict[str, Any]:
    checkpoints = read_summary(best_dir)
    if not Path(data_dir).exists():
        raise ExportError(f"data folder {data_dir} not found (set DATA_DIR or pass --data-dir)")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images = parity.load_images(data_dir, "test", n_images)
    reports = {}
    for family, checkpoint in checkpoints.items():
        reports[family] = export_family(family, checkpoint, out_dir, images)
        print(parity.format_line(family, reports[family]), flush=True)
    result = {"passed": parity.all_passed(list(reports.values())), "tolerance": parity.TOLERANCE,
              "data_dir": str(data_dir), "split": "test", "seconds": round(time.perf_counter() - t0, 2),
              "models": reports}
    (out_dir / "parity.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--best-dir", type=Path, default=DEFAULT_BEST)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--data-dir", type=Path, default=None, help="default: $DATA_DIR or ../shared/data/chest_xray")
    p.add_argument("--parity-images", type=int, default=None,
                   help=f"test images to check (default all; at least {parity.MIN_IMAGES} when available)")
    args = p.parse_args(argv)
    try:
        result = run(args.best_dir, args.out_dir, args.data_dir or default_data_dir(), args.parity_images)
    except (ExportError, FileNotFoundError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    if not result["passed"]:
        failed = [f for f, r in result["models"].items() if not r["passed"]]
        print(f"export: PARITY FAILED for {', '.join(failed)} (tolerance {parity.TOLERANCE:g} on P(pneumonia), "
              f"labels must be identical): see {args.out_dir / 'parity.json'}", file=sys.stderr)
        return 1
    print(f"export: {len(result['models'])} model(s) -> {args.out_dir} (parity passed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
