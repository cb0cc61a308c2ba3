"""The course's studies as named grids of TrainConfig overrides, and the default set (`make train`).

    python -m training.experiments --study default            # best mlp_bce, mlp_ce, xraynet -> artifacts/best/
    python -m training.experiments --study all [--quick]      # every course study -> reports/experiments.md
    python -m training.experiments --study lr dropout --only lr-1e-3

Runs execute in-process, seeded, sharing the loaded data when input size and limits match.
Each run writes RUNS_DIR/STUDY/RUN/ (best.pt, history.json, metrics.json, curves.png); the
report (REPORTS_DIR/experiments.md + .json, plots/STUDY.png) keeps earlier studies' results
and replaces those of the studies run now. --quick runs CI-sized variants: a stratified subset,
1-2 epochs, at most 2 points per grid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib
import torch

from handlers import constants as C
from training import distributed
from training.plots import plot_bars
from training.sources import default_data_dir
from training.train import TrainConfig, load_data, train

# Course-like settings: Adam, constant LR, no scheduler, class-balanced loss, no augmentation.
COURSE = dict(optimizer="adam", weight_decay=0.0, scheduler="none", balance="loss", augment=False, lr=1e-3,
              batch_size=32, epochs=10, patience=0)
MLP = COURSE | dict(arch="mlp", head="bce", input_size=64, arch_args={"hidden": [512, 128], "dropout": 0.5})
CNN = COURSE | dict(arch="cnn", head="bce", input_size=64, arch_args={"pool": 2})
# The default set: modern settings (AdamW, cosine, augmentation), picked per family on validation.
MODERN = dict(optimizer="adamw", weight_decay=1e-4, scheduler="cosine", augment=True, lr=1e-3, batch_size=32)
XRAYNET = MODERN | dict(arch="xraynet", head="bce", input_size=128, epochs=12)


def mlp(dropout: float = 0.5, **kw: Any) -> dict[str, Any]:
    return MLP | {"arch_args": {"hidden": [512, 128], "dropout": dropout}} | kw


# name -> (what it asks, the knobs that vary, [(run, overrides, note)]); runs are full configs.
STUDIES: dict[str, tuple[str, list[str], list[tuple[str, dict[str, Any], str]]]] = {
    "default": (
        "The default set (`make train`): the best BCE-MLP, CE-MLP and CNN, picked by validation ROC AUC.",
        ["arch_args", "epochs", "optimizer", "scheduler", "augment"],
        [(f"mlp_{h}-d{d}", MLP | MODERN | {"head": h, "epochs": 15, "arch_args": {"hidden": [512, 128],
                                                                                  "dropout": d}}, "")
         for h in ("bce", "ce") for d in (0.5, 0.7)]
        + [("xraynet", XRAYNET, "")],  # a gap_cnn pool-4 candidate (128 px) lost on val: see gap_pool
    ),
    "loss": ("BCE (1 logit + sigmoid) or CE (2 logits + softmax) for the MLP?", ["head"],
             [(f"loss-{h}", mlp(0.7, head=h), "") for h in ("bce", "ce")]),
    "batch_size": ("How does the batch size change the MLP's result and training time?", ["batch_size"],
                   [(f"batch-{b}", mlp(batch_size=b), "") for b in (2, 16, 32, 64, 128)]),
    "lr": ("Which constant Adam learning rate trains the MLP best?", ["lr"],
           [(f"lr-{lr:g}", mlp(lr=lr), "") for lr in (1e-4, 5e-4, 1e-3, 1e-2, 1e-1)]),
    "dropout": ("How much dropout does the MLP want?", ["dropout"],
                [(f"dropout-{d}", mlp(d), "") for d in (0.3, 0.5, 0.7)]),
    "epochs": ("How long to train the MLP: does it over-fit (watch the train vs val gap)?", ["epochs"],
               [(f"epochs-{e}", mlp(epochs=e), "") for e in (5, 10, 25, 50, 100)]),
    "depth": ("Deeper MLP: 2 hidden layers vs 4 hidden layers with BatchNorm.", ["arch", "hidden"],
              [("depth-mlp", mlp(), ""),
               ("depth-bn_mlp", mlp(arch="bn_mlp", arch_args={"hidden": [512, 256, 128, 64], "dropout": 0.5}),
                "")]),
    "cnn_vs_mlp": ("Course CNN vs MLP: parameters, training time, accuracy.", ["arch"],
                   [("cnn_vs_mlp-mlp", mlp(), ""), ("cnn_vs_mlp-cnn", CNN, "")]),
    "l2": ("Course CNN with Adam's (coupled) L2 weight decay 0 vs 0.01 and StepLR: less over-fitting?",
           ["weight_decay"],
           [(f"l2-wd{wd:g}", CNN | {"weight_decay": wd, "scheduler": "step", "step_size": 5, "gamma": 0.5},
             "") for wd in (0.0, 0.01)]),
    "gap_pool": ("GAP-CNN with 2x2 or 4x4 max-pooling?", ["pool"],
                 [(f"gap_pool-{p}", CNN | {"arch": "gap_cnn", "arch_args": {"pool": p}}, "")
                  for p in (2, 4)]),
    "ours": ("Our CNN (XrayNet, BatchNorm + GAP, 128 px, AdamW + cosine + augmentation).", ["arch"],
             [("ours-xraynet", XRAYNET, "")]),
}
COURSE_STUDIES = [s for s in STUDIES if s != "default"]
FAMILIES = ("mlp_bce", "mlp_ce", "xraynet")  # a family is a run name's part before "-"
QUICK = dict(limit_train=300, limit_eval=200)
INTRO = """Every run: seed 0, the real train/val/test splits, normalised with the train split's mean/std.
*final* = the weights after the last epoch at threshold 0.5; *best* = the checkpoint with the best
validation ROC AUC, at its validation-tuned (Youden) threshold. *train acc* is the last epoch's running
accuracy (dropout and augmentation on). Course-like settings unless a row says otherwise: Adam, constant
LR 1e-3, batch 32, no weight decay, class-balanced loss, no augmentation, 64 px. Run names link to their
training curves. *quick* runs are CI-sized (300 train / 200 val and test images, 1-2 epochs, <= 64 px)."""


def quick_variant(cfg: dict[str, Any]) -> dict[str, Any]:
    """CI-sized: a subset, 1-2 epochs (keeping the grid's order), at most 64 px."""
    epochs = min(2, max(1, cfg["epochs"] // 5))
    return cfg | QUICK | {"epochs": epochs, "input_size": min(cfg["input_size"], 64)}


def plan(study: str, quick: bool, only: list[str] | None) -> list[tuple[str, dict[str, Any], str]]:
    runs = STUDIES[study][2]
    if quick:  # the grid's ends; the default set keeps one run per family
        if study == "default":
            runs = [r for r in runs if r[0].endswith("-d0.5") or r[0] == "xraynet"]
        else:
            runs = runs[:: max(1, len(runs) - 1)][:2]
        runs = [(name, quick_variant(cfg), "quick") for name, cfg, _ in runs]
    return [r for r in runs if not only or r[0] in only]


_DATA: dict[tuple, dict[str, Any]] = {}


def shared_data(cfg: TrainConfig) -> dict[str, Any]:
    """load_data once per (data set, size, limits, seed); keep the last two (64 and 128 px)."""
    key = (str(cfg.data_dir), cfg.input_size, cfg.limit_train, cfg.limit_eval, cfg.seed)
    if key not in _DATA:
        while len(_DATA) >= 2:
            _DATA.pop(next(iter(_DATA)))
        with distributed.main_first(distributed.init()):  # one rank fills the decode cache
            _DATA[key] = load_data(cfg)
    return _DATA[key]


def same_as(config: dict[str, Any]) -> str:
    """What makes two runs the same run: the config without its name and where it is written."""
    return json.dumps({k: v for k, v in config.items() if k not in ("name", "out_dir", "progress")},
                      sort_keys=True)


def finished_runs(runs_dir: Path) -> dict[str, Path]:
    """Finished runs under RUNS_DIR (for --reuse): same_as(config) -> metrics.json."""
    found = {}
    for path in sorted(runs_dir.glob("*/*/metrics.json")):
        if (path.parent / "best.pt").is_file():
            found.setdefault(same_as(json.loads(path.read_text())["config"]), path)
    return found


def run_study(study: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    out_dir = Path(args.runs_dir) / (study + ("-quick" if args.quick else ""))
    for name, overrides, note in plan(study, args.quick, args.only):
        cfg = TrainConfig.model_validate(overrides | {"name": name, "data_dir": args.data_dir,
                                                      "out_dir": out_dir, "seed": args.seed})
        done = finished_runs(Path(args.runs_dir)).get(same_as(cfg.model_dump(mode="json"))) if args.reuse else None
        if done:
            result = json.loads(done.read_text()) | {"name": name}
            note = ", ".join(filter(None, [note, f"reused {done.parent.relative_to(args.runs_dir)}"]))
        else:
            result = train(cfg, shared_data(cfg))
        run_dir = Path(result["checkpoint"]).parent
        # train() returns its history; a reused run's is on disk
        history = result.pop("history", None) or json.loads((run_dir / "history.json").read_text())
        result |= {"study": study, "note": note, "train_accuracy": history[-1]["train_accuracy"],
                   "curves": str(run_dir / "curves.png")}
        v, t = result["val"], result["test"]
        if distributed.init().is_main:
            print(f"[{study}] {name}: {result['train_seconds']:.1f}s, {result['epochs_run']} ep, val auc "
                  f"{v['roc_auc']:.4f}, test bal {t['balanced_accuracy']:.4f} auc {t['roc_auc']:.4f}", flush=True)
        results.append(result)
    return results


def family(run: str) -> str:
    return run.split("-")[0]


def select_best(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per family, the run with the best validation score (config.select), then val balanced accuracy."""
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        sel = r["config"]["select"]
        key = (-r["val"]["loss"] if sel == "loss" else r["val"][sel], r["val"]["balanced_accuracy"])
        cur = best.get(family(r["name"]))
        if cur is None or key > cur["_key"]:
            best[family(r["name"])] = r | {"_key": key}
    return best


def write_best(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    best_dir = Path(args.best_dir)
    best_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for fam, r in sorted(select_best(results).items()):
        ckpt = torch.load(r["checkpoint"], map_location="cpu", weights_only=True)
        ckpt["card"]["name"] = fam
        torch.save(ckpt, best_dir / f"{fam}.pt")
        models[fam] = {"checkpoint": f"{fam}.pt", "run": r["name"], "val": r["val"], "test": r["test"],
                       "params": r["params"], "train_seconds": r["train_seconds"], "config": r["config"]}
    summary = {"models": models, "data_dir": str(args.data_dir), "quick": args.quick,
               "created": datetime.now(UTC).isoformat(timespec="seconds")}
    (best_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'family':8} {'run':18} {'val auc':>8} {'test bal':>9} {'test auc':>9} {'sens':>7} {'spec':>7}")
    for fam, m in models.items():
        v, t = m["val"], m["test"]
        print(f"{fam:8} {m['run']:18} {v['roc_auc']:8.4f} {t['balanced_accuracy']:9.4f} {t['roc_auc']:9.4f} "
              f"{t['sensitivity']:7.4f} {t['specificity']:7.4f}")
    print(f"-> {best_dir}/summary.json")
    return summary


# ---- report -----------------------------------------------------------------------------------


def knob(cfg: dict[str, Any], k: str) -> Any:
    if k in cfg:
        return cfg[k]
    return cfg["arch_args"].get(k, "")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:g}"
    if isinstance(v, dict | list):
        return json.dumps(v).replace("|", "\\|")
    return str(v)


def study_section(study: str, entry: dict[str, Any], reports_dir: Path, links: bool = True) -> str:
    asks, vary, _ = STUDIES[study]
    rows = entry["results"]
    title = f"## {study}" + (" (quick, CI-sized)" if entry["quick"] else "")
    lines = [title, "", f"*What it asks:* {asks}", ""]
    cols = ["run", *vary, "model", "params", "train s", "epochs run", "train acc", "final val acc",
            "final test acc", "gap (train - val)", "best val acc", "test acc", "test bal acc", "sens", "spec",
            "test AUC", "note"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        c, t = r["config"], r["test"]
        name = r["name"]
        if links:
            name = f"[{name}]({os.path.relpath(r['curves'], reports_dir)})"
        test = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "roc_auc")
        cells = [name, *(fmt(knob(c, k)) for k in vary), f"{c['arch']}/{c['head']}@{c['input_size']}px",
                 f"{r['params']:,}", f"{r['train_seconds']:.1f}", f"{r['epochs_run']} (best {r['best_epoch']})",
                 fmt(r["train_accuracy"]), fmt(r["final_val_accuracy"]), fmt(r["final_test_accuracy"]),
                 f"{r['train_accuracy'] - r['final_val_accuracy']:+.4f}", fmt(r["best_val_accuracy_at_0.5"]),
                 *(fmt(t[k]) for k in test), r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![{study}](plots/{study}.png)", ""]
    return "\n".join(lines)


def render(studies: dict[str, dict[str, Any]], reports_dir: Path, links: bool = True) -> str:
    head = ["# Experiments", "", INTRO, ""]
    for study, entry in studies.items():
        quick = " (quick)" if entry["quick"] else ""
        head.append(f"- [{study}](#{study}){quick}: {len(entry['results'])} runs, "
                    f"{entry['seconds']:.0f} s wall, finished {entry['created']}")
    sections = [study_section(s, e, reports_dir, links) for s, e in studies.items()]
    return "\n".join(head) + "\n\n" + "\n".join(sections)


def write_report(new: dict[str, dict[str, Any]], reports_dir: Path) -> Path:
    """Merge this invocation's studies into REPORTS_DIR/experiments.json and rewrite experiments.md."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    js = reports_dir / "experiments.json"
    studies = json.loads(js.read_text())["studies"] if js.is_file() else {}
    studies |= new
    studies = {s: studies[s] for s in STUDIES if s in studies}
    js.write_text(json.dumps({"studies": studies}, indent=1))
    for study, entry in new.items():
        rows = entry["results"]
        labels = [r["name"].removeprefix(f"{study}-") for r in rows]
        with matplotlib.rc_context({"legend.loc": "lower left", "legend.fontsize": 8, "legend.framealpha": 0.95}):
            plot_bars(labels,
                      {"final val acc": [r["final_val_accuracy"] for r in rows],
                       "final test acc": [r["final_test_accuracy"] for r in rows],
                       "test bal acc (best)": [r["test"]["balanced_accuracy"] for r in rows],
                       "test AUC (best)": [r["test"]["roc_auc"] for r in rows]},
                      reports_dir / "plots" / f"{study}.png", title=study, ylabel="score")
    out = reports_dir / "experiments.md"
    out.write_text(render(studies, reports_dir))
    return out


def publish(reports_dir: Path, docs_dir: Path) -> Path:
    """REPORTS_DIR's report -> DOCS_DIR/experiments.md + plots/, without links to (uncommitted) run folders."""
    studies = json.loads((reports_dir / "experiments.json").read_text())["studies"]
    (docs_dir / "plots").mkdir(parents=True, exist_ok=True)
    for study in studies:
        shutil.copyfile(reports_dir / "plots" / f"{study}.png", docs_dir / "plots" / f"{study}.png")
    out = docs_dir / "experiments.md"
    out.write_text(render(studies, docs_dir, links=False).replace(" Run names link to their\ntraining curves.", ""))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", nargs="+", default=["default"], help=f"default, all, or of {COURSE_STUDIES}")
    p.add_argument("--quick", action="store_true", help="CI-sized variants")
    p.add_argument("--only", nargs="+", help="run only these run names")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--runs-dir", type=Path, default=C.RUNS_DIR)
    p.add_argument("--best-dir", type=Path, default=C.BEST_DIR)
    p.add_argument("--reports-dir", type=Path, default=C.REPORTS_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse a finished run whose config is identical")
    p.add_argument("--publish", type=Path, metavar="DOCS_DIR", help="only copy the report to DOCS_DIR")
    args = p.parse_args(argv)
    if args.publish:
        print(f"published -> {publish(Path(args.reports_dir), args.publish)}")
        return
    studies = [s for name in args.study for s in (COURSE_STUDIES if name == "all" else [name])]
    if unknown := [s for s in studies if s not in STUDIES]:
        p.error(f"unknown study {unknown}; choose from default, all, {COURSE_STUDIES}")
    # Under torchrun (make train NPROC=N) every rank runs every study; rank 0 alone writes.
    d = distributed.init()
    t0 = time.perf_counter()
    for study in studies:
        ts = time.perf_counter()
        results = run_study(study, args)
        if not results or not d.is_main:
            continue
        if study == "default":
            write_best(results, args)
        entry = {"quick": args.quick, "seconds": round(time.perf_counter() - ts, 1), "results": results,
                 "created": datetime.now(UTC).isoformat(timespec="seconds")}
        print(f"report -> {write_report({study: entry}, Path(args.reports_dir))}", flush=True)
    distributed.shutdown(d)
    if d.is_main:
        print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
