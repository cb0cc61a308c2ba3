"""The course's studies at the course's own settings, and the default set (`make train`).

    python -m training.experiments --study default            # best mlp_bce, mlp_ce, xraynet -> artifacts/best/
    python -m training.experiments --study all [--quick]      # every course study, 3 seeds -> reports/
    python -m training.experiments --study lr --seeds 0       # one study, one seed
    python -m training.experiments --publish docs             # reports/ -> docs/experiments.md + plots

Two profiles. `make train` (the default set) uses our tuned settings: AdamW, cosine LR,
class-balanced loss, augmentation, best checkpoint by validation ROC AUC. `make experiments`
(every other study) uses the course's: plain BCEWithLogitsLoss / CrossEntropyLoss without class
weights, Adam, constant LR unless the study names a scheduler, no augmentation, the course's
architectures, and every setting over 3 seeds. The course read test accuracy at 0.5 after the last
epoch; that is the *final* column here.

Runs execute in-process, single-threaded (on a shared 2-core machine, two torch threads spin
against other work and run 10-20x slower than one), sharing the loaded data. Each run writes
RUNS_DIR/STUDY/RUN/ (best.pt, history.json, metrics.json, curves.png); each study writes
REPORTS_DIR/studies/STUDY.json (so studies may run in parallel processes), and every invocation
re-renders REPORTS_DIR/experiments.md + .json and plots/STUDY_curves.png. --quick runs CI-sized
variants: a stratified subset, 1-2 epochs, one seed, at most 2 settings per study.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from handlers import constants as C
from training import distributed
from training.models import build_model
from training.plots import plot_study_curves
from training.sources import default_data_dir
from training.train import TrainConfig, load_data, make_criterion, make_optimizer, predict, train, training_loss

# The course's profile: Adam, constant LR 1e-3, batch 32, no weight decay, no class weights, no
# augmentation; the last epoch's weights are the result (no early stopping). No OOD gate: never served.
COURSE = dict(optimizer="adam", weight_decay=0.0, scheduler="none", balance="none", augment=False, lr=1e-3,
              batch_size=32, epochs=10, patience=0, threads=1, ood_gate=False)
# The course's ANN at the course's 256 px: 3 hidden layers of 32 (its 2,099,329 parameters are exactly
# this net), BCE, dropout 0.7 (its best), 10 epochs (its best). ~1.3 CPU s an epoch (fused Adam).
ANN = COURSE | dict(arch="mlp", head="bce", input_size=256, arch_args={"hidden": [32, 32, 32], "dropout": 0.7})
# The course CNN costs ~234 CPU s an epoch at 256 px here (one thread): its studies run at 64 px (~10 s).
CNN_SIZE = 64
CNN = COURSE | dict(arch="cnn", head="bce", input_size=CNN_SIZE, arch_args={"pool": 2})
# The course's GAP study: pool 2 (a 32x32 map before GAP at 256 px) vs pool 4 (4x4). At 64 px, pools
# (4, 2, 2) leave the course's 4x4 map; (2, 2, 2) leaves 8x8.
GAP_POOLS = ([2, 2, 2], [4, 2, 2])

# The default set: our tuned settings, picked per family on validation. Not a course setting.
TUNED = dict(optimizer="adamw", weight_decay=1e-4, scheduler="cosine", balance="loss", augment=True, lr=1e-3,
             batch_size=32, patience=0)
TUNED_MLP = TUNED | dict(arch="mlp", input_size=64, epochs=15)
# Issue 17 (docs/experiments.md, "xraynet: tuning"): two convolutions in the last two blocks (nearly free
# at 16x16 and 8x8), 20 epochs, and an EMA of the weights, which is what is validated and shipped.
# Measured and not kept (the same section): members=2 (a packed pair), precision="bf16", 176 px.
XRAYNET = TUNED | dict(arch="xraynet", head="bce", input_size=128, epochs=20, ema=0.995,
                       arch_args={"convs": [1, 1, 1, 2, 2]})


def ann(**kw: Any) -> dict[str, Any]:
    """The course ANN with some knobs changed; dropout/hidden go into arch_args."""
    args = ANN["arch_args"] | {k: kw.pop(k) for k in ("dropout", "hidden") if k in kw}
    return ANN | {"arch_args": args} | kw


@dataclass(frozen=True)
class Study:
    asks: str
    vary: list[str]
    runs: list[tuple[str, dict[str, Any], str]]  # (setting, full config, note)
    course: str = ""  # the course's result, as its reports give it
    setting: str = ""  # how our runs are set up, and where they differ from the course's
    seeds: int = 3
    once: tuple[str, ...] = ()  # settings run with one seed by default: too slow on 2 shared cores for 3


STUDIES: dict[str, Study] = {
    "default": Study(
        "The default set (`make train`, our tuned profile): the best BCE-MLP, CE-MLP and CNN, by validation ROC AUC.",
        ["arch_args", "epochs", "optimizer", "scheduler", "augment"],
        [(f"mlp_{h}-d{d}", TUNED_MLP | {"head": h, "arch_args": {"hidden": [512, 128], "dropout": d}}, "")
         for h in ("bce", "ce") for d in (0.5, 0.7)]
        + [("xraynet", XRAYNET, "")],
        seeds=1),
    "loss": Study(
        "BCE (1 logit + sigmoid) or CE (2 logits + softmax) for the ANN, at dropout 0.7 and 10 epochs?",
        ["head"], [(f"loss-{h}", ann(head=h), "") for h in ("bce", "ce")],
        course="80.75% (BCE) vs 73% (CE); another report 72% vs 73% with a single hidden layer."),
    "batch_size": Study(
        "How does the batch size change the ANN's result and its training time?", ["batch_size", "epochs"],
        [(f"batch-{b}", ann(batch_size=b), "") for b in (2, 16, 32, 64, 128)]
        + [(f"batch-{b}-e30", ann(batch_size=b, epochs=30), "") for b in (16, 128)],
        course="2 / 16 / 32 / 64 at 10 epochs: 72-76%; 16 vs 128 at 30 epochs: 74% vs 72.25%."),
    "lr": Study(
        "Which constant Adam learning rate trains the ANN best (CE, 3 hidden layers, 30 epochs)?", ["lr"],
        [(f"lr-{lr:g}", ann(head="ce", epochs=30, lr=lr), "") for lr in (1e-4, 5e-4, 1e-3, 1e-2, 1e-1)],
        course="1e-4 / 5e-4 / 1e-2: 75.5 / 70.75 / 75.0%; a third report discusses 1e-3, 1e-2, 1e-1."),
    "dropout": Study(
        "How much dropout does the ANN want (none, 0.3, 0.5, 0.7)?", ["dropout"],
        [(f"dropout-{d:g}", ann(dropout=d), "") for d in (0.0, 0.3, 0.5, 0.7)],
        course="0.7 best, 78.75%; three repeats of dropout 0.7 + 10 epochs all above 81%."),
    "epochs": Study(
        "How long to train the ANN: where does it start to over-fit?", ["head", "epochs"],
        [(f"epochs-{e}", ann(epochs=e), "") for e in (5, 10, 25, 50)]
        + [(f"epochs-ce-{e}", ann(head="ce", epochs=e), "") for e in (10, 50, 100)],
        course="BCE: 5 / 10 / 25 / 50 epochs, 10 best (82.5%); CE at lr 1e-3: 10 / 50 / 100 -> 75.75 / 71.25 / 74.0%."),
    "depth": Study(
        "Does a deeper MLP with BatchNorm help?", ["arch", "arch_args"],
        [("depth-ann", ann(), ""),
         ("depth-bn_mlp", ann(arch="bn_mlp", hidden=[64, 256, 128], dropout=0.5), "")],
        course="Linear(64, 256) + BatchNorm1d + ReLU + Dropout(0.5), Linear(256, 128) + BatchNorm1d + ReLU + "
               "Dropout(0.5) added: no gain (72%).",
        setting="bn_mlp = [Linear, BatchNorm1d, ReLU, Dropout(0.5)] x (64, 256, 128) -> output: the course's two "
                "added blocks behind a 64-wide first layer."),
    "cnn_vs_mlp": Study(
        "The course CNN vs the ANN: parameters, training and inference time, accuracy.", ["arch"],
        [("cnn_vs_mlp-ann", ann(), ""), ("cnn_vs_mlp-ann64", ann(input_size=CNN_SIZE), ""),
         ("cnn_vs_mlp-cnn", CNN, "")],
        course="At 256 px and 50 epochs: ANN 2,099,329 parameters, CNN 1,049,505; training 16.4 s vs 109.3 s, "
               "validation 2.8 s vs 10.6 s.",
        setting=f"The CNN at {CNN_SIZE} px and 10 epochs, not 256 px and 50: it costs ~234 CPU s an epoch at 256 "
                f"px here (one thread), so 3 seeds x 50 epochs would take ~10 CPU-hours; at {CNN_SIZE} px ~10 s. "
                f"Its maps still exist ({CNN_SIZE} -> 32 -> 16 -> 8 px before the FC layer). The ANN runs at "
                f"{CNN_SIZE} px beside it (the same input) and at the course's 256 px."),
    "l2": Study(
        "Does L2 (Adam weight_decay 0.01) with StepLR(10, 0.1) over 50 epochs stop the validation loss rising?",
        ["weight_decay"],
        [(f"l2-wd{wd:g}", ann(epochs=50, weight_decay=wd, scheduler="step", step_size=10, gamma=0.1), "")
         for wd in (0.0, 0.01)],
        course="Judged by the slope of the validation loss over epochs 31-50.",
        setting="On the course ANN (50 CNN epochs x 2 x 3 seeds do not fit here). Both arms use the same StepLR."),
    "gap_pool": Study(
        "GAP-CNN (AdaptiveAvgPool2d(1) after the convolutions): 2x2 or 4x4 max-pooling?", ["pool"],
        [("gap_pool-" + "x".join(map(str, p)), CNN | {"arch": "gap_cnn", "arch_args": {"pool": p}}, "")
         for p in GAP_POOLS],
        course="4x4 pooling so that the map before GAP is 4x4: train accuracy 83.9% -> 91.9%, validation "
               "85.8% -> 92.3%.",
        setting=f"{CNN_SIZE} px, 10 epochs: pools (4, 2, 2) leave the course's 4x4 map before GAP, (2, 2, 2) "
                "leave 8x8 (the course's pool 2 left 32x32 at 256 px). At 256 px an epoch costs ~131 CPU s (pool "
                "4) and ~234 s (pool 2) here, 3 seeds x 2 arms ~4 CPU-hours at 10 epochs; 128 px with (4, 4, 2) "
                "vs (2, 2, 2) (4x4 vs 16x16) measured ~85 s an epoch for the pair, ~43 CPU-min: over this run's "
                "budget."),
}
COURSE_STUDIES = [s for s in STUDIES if s != "default"]
FAMILIES = ("mlp_bce", "mlp_ce", "xraynet")  # a family is a run name's part before "-"
QUICK = dict(limit_train=300, limit_eval=200)


def quick_variant(cfg: dict[str, Any]) -> dict[str, Any]:
    """CI-sized: a subset, 1-2 epochs (keeping the grid's order), at most 64 px."""
    epochs = min(2, max(1, cfg["epochs"] // 5))
    return cfg | QUICK | {"epochs": epochs, "input_size": min(cfg["input_size"], 64)}


def plan(study: str, quick: bool, only: list[str] | None, seeds: list[int] | None = None,
         ) -> list[tuple[str, dict[str, Any], str]]:
    """The study's runs: every setting x seed (seeds default to the study's 0..n-1; one when quick).

    A multi-seed study names its runs SETTING-sSEED; `only` matches a setting or a run name.
    """
    s = STUDIES[study]
    runs = s.runs
    if quick:  # the grid's ends; the default set keeps one run per family
        if study == "default":
            runs = [r for r in runs if r[0].endswith("-d0.5") or r[0] == "xraynet"]
        else:
            runs = runs[:: max(1, len(runs) - 1)][:2]
        runs = [(name, quick_variant(cfg), "quick") for name, cfg, _ in runs]
    out = []
    for name, cfg, note in runs:
        if seeds is not None:
            run_seeds = seeds
        elif quick or name in s.once:
            run_seeds = [0]
            note = note or "seed 0 only (time)"
        else:
            run_seeds = list(range(s.seeds))
        for seed in run_seeds:
            run = name if study == "default" else f"{name}-s{seed}"
            if not only or name in only or run in only:
                out.append((run, cfg | {"seed": seed}, note))
    return out


def setting_of(run: str) -> str:
    return re.sub(r"-s\d+$", "", run)


_DATA: dict[tuple, dict[str, Any]] = {}


def shared_data(cfg: TrainConfig) -> dict[str, Any]:
    """load_data once per (data set, size, limits); keep the last two sizes. The seed only picks subsets."""
    key = (str(cfg.data_dir), cfg.input_size, cfg.limit_train, cfg.limit_eval, cfg.seed if cfg.limit_train else 0)
    if key not in _DATA:
        while len(_DATA) >= 2:
            _DATA.pop(next(iter(_DATA)))
        with distributed.main_first(distributed.init()):  # one rank fills the decode cache
            _DATA[key] = load_data(cfg)
    return _DATA[key]


def same_as(config: dict[str, Any]) -> str:
    """What makes two runs the same run: the config without its name, where it is written and what
    only its finishing step adds (the OOD gate changes no weight and no study measure). A run saved
    before a knob existed has that knob's default: validating fills it in, so the run still matches."""
    try:
        full = TrainConfig.model_validate(config).model_dump(mode="json")
    except ValidationError:  # a knob this version does not know: never the same run as one of ours
        full = config
    return json.dumps({k: v for k, v in full.items() if k not in ("name", "out_dir", "progress", "ood_gate")},
                      sort_keys=True)


def finished_runs(runs_dir: Path) -> dict[str, Path]:
    """Finished runs under RUNS_DIR (for --reuse): same_as(config) -> metrics.json."""
    found = {}
    for path in sorted(runs_dir.glob("*/*/metrics.json")):
        if (path.parent / "best.pt").is_file():
            found.setdefault(same_as(json.loads(path.read_text())["config"]), path)
    return found


def cpu_timings(checkpoint: str, cfg: TrainConfig, data: dict[str, Any], steps: int = 8) -> dict[str, float]:
    """CPU seconds (process time, one thread) to predict the test split, and a training epoch's CPU cost
    estimated from STEPS optimiser steps at the run's batch size. Process time, unlike wall time, does not
    grow with the other jobs on a shared machine."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    card = state["card"]
    model = build_model(card["arch"], card["head"], card["input_size"], card["arch_args"])
    model.load_state_dict(state["state_dict"])
    predict(model, data["test"].x[:8], cfg.head)  # warm-up: first-call allocations are not inference
    t0 = time.process_time()
    predict(model, data["test"].x, cfg.head)
    infer = time.process_time() - t0
    train_split = data["train"]
    model.train()
    criterion = make_criterion(cfg, train_split.y)
    opt = make_optimizer(cfg, model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(len(train_split), (max(2, cfg.batch_size),), generator=g) for _ in range(steps + 1)]
    for i, idx in enumerate(batches):
        if i == 1:  # the first step allocates optimiser state: not steady-state cost
            t0 = time.process_time()
        loss, _ = training_loss(criterion, model(train_split.x[idx]), train_split.y[idx], cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    per_step = (time.process_time() - t0) / steps
    return {"infer_cpu_seconds_test": infer,
            "train_cpu_seconds_per_epoch": per_step * -(-len(train_split) // cfg.batch_size)}


def study_dir(args: argparse.Namespace, study: str) -> Path:
    return Path(args.runs_dir) / (study + ("-quick" if args.quick else ""))


def run_config(overrides: dict[str, Any], name: str, study: str, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.model_validate(overrides | {"name": name, "data_dir": args.data_dir,
                                                   "out_dir": study_dir(args, study)})


def trajectory_key(overrides: dict[str, Any]) -> str | None:
    """Runs with equal keys differ only in their epoch count and can be read from the longest one;
    None where the epoch count changes the path (early stopping, a cosine schedule sized by it)."""
    if overrides.get("patience") or overrides.get("scheduler") == "cosine":
        return None
    return json.dumps({k: v for k, v in overrides.items() if k != "epochs"}, sort_keys=True)


@dataclass
class Trajectory:
    study: str
    name: str
    overrides: dict[str, Any]
    epochs: set[int]  # every epoch count planned with this key


def trajectories(plans: dict[str, list[tuple[str, dict[str, Any], str]]]) -> dict[str, Trajectory]:
    """Per trajectory key, the longest planned run (the first planned, on a tie) and every epoch count."""
    out: dict[str, Trajectory] = {}
    for study, runs in plans.items():
        for name, overrides, _ in runs:
            key = trajectory_key(overrides)
            if key is None:
                continue
            t = out.setdefault(key, Trajectory(study, name, overrides, set()))
            t.epochs.add(overrides["epochs"])
            if overrides["epochs"] > t.overrides["epochs"]:
                t.study, t.name, t.overrides = study, name, overrides
    return out


def run_trajectory(t: Trajectory, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The longest run, and a snapshot run (NAME-atK) at every shorter planned epoch count K."""
    cfg = run_config(t.overrides, t.name, t.study, args)
    snaps = {k: cfg.model_copy(update={"epochs": k, "name": f"{t.name}-at{k}"})
             for k in sorted(t.epochs) if k < cfg.epochs}
    if snaps:
        print(f"[{t.study}] {t.name}: one {cfg.epochs}-epoch run, read at epochs {sorted(snaps)} as well",
              flush=True)
    result = train(cfg, shared_data(cfg), snapshots=snaps)
    return [result, *result.pop("snapshots")]


def source_note(done: Path, runs_dir: Path) -> str:
    """Where a reused run's numbers come from, by setting: 'same run as STUDY/SETTING' or
    'epoch K of STUDY/SETTING' (a snapshot of a longer run)."""
    source = done.parent.relative_to(runs_dir)
    m = re.fullmatch(r"(.+)-at(\d+)", source.name)
    if m:
        return f"epoch {m[2]} of {source.parent}/{setting_of(m[1])}"
    return f"same run as {source.parent}/{setting_of(source.name)}"


_MADE: dict[str, Path] = {}  # same_as(config) -> metrics.json, for runs made by this invocation


def run_study(study: str, args: argparse.Namespace, longest: dict[str, Trajectory] | None = None,
              ) -> list[dict[str, Any]]:
    results = []
    longest = longest or {}
    for name, overrides, note in plan(study, args.quick, args.only, args.seeds):
        cfg = run_config(overrides, name, study, args)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        key = same_as(cfg.model_dump(mode="json"))
        done = _MADE.get(key) or (finished_runs(Path(args.runs_dir)).get(key) if args.reuse else None)
        if not done and args.collect:
            print(f"[{study}] {name}: not run yet, left out", flush=True)
            continue
        traj = longest.get(trajectory_key(overrides) or "")
        if not done and traj and traj.overrides["epochs"] > cfg.epochs:
            for made in run_trajectory(traj, args):  # this run is one of its snapshots
                _MADE[same_as(made["config"])] = Path(made["checkpoint"]).parent / "metrics.json"
            done = _MADE[key]
        data = shared_data(cfg)
        if done:
            result = json.loads(done.read_text()) | {"name": name}
            note = ", ".join(filter(None, [note, source_note(done, Path(args.runs_dir))]))
        else:
            snaps = {k: cfg.model_copy(update={"epochs": k, "name": f"{name}-at{k}"})
                     for k in sorted(traj.epochs if traj else ()) if k < cfg.epochs}
            result = train(cfg, data, snapshots=snaps)
            for made in [result, *result.pop("snapshots")]:
                _MADE[same_as(made["config"])] = Path(made["checkpoint"]).parent / "metrics.json"
        run_dir = Path(result["checkpoint"]).parent
        # train() returns its history; a reused run's is on disk
        history = result.pop("history", None) or json.loads((run_dir / "history.json").read_text())
        result |= {"study": study, "setting": setting_of(name), "note": note,
                   "train_accuracy": history[-1]["train_accuracy"], "history": history,
                   "seconds_per_epoch": result["train_seconds"] / max(1, result["epochs_run"]),
                   "curves": str(run_dir / "curves.png")}
        if study != "default":  # make train stays as it was: no extra pass
            result |= cpu_timings(result["checkpoint"], cfg, data)
        v, t = result["val"], result["test"]
        if distributed.init().is_main:
            print(f"[{study}] {name}: {result['train_seconds']:.1f}s, {result['epochs_run']} ep, final test acc "
                  f"{result['final_test_accuracy']:.4f}, val auc {v['roc_auc']:.4f}, test bal "
                  f"{t['balanced_accuracy']:.4f} auc {t['roc_auc']:.4f}", flush=True)
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

INTRO = """Two profiles, never mixed. **`make train`** (the default set, README's table) uses our tuned settings:
AdamW, cosine LR, class-balanced loss, augmentation, the best epoch by validation ROC AUC at a
validation-tuned threshold. **`make experiments`** (every study below) uses the **course's**: Adam at a
constant LR 1e-3 unless swept, batch 32, plain BCEWithLogitsLoss / CrossEntropyLoss **without class
weights**, no augmentation, no scheduler unless the study names one, the course's ANN (3 hidden layers
of 32, dropout 0.7, BCE, 10 epochs) **at the course's 256 px**, and its CNN (3 x [Conv 32 3x3, ReLU,
MaxPool 2x2], FC 32) at 64 px (the *Our setting* lines say why). Every setting is planned with seeds 0,
1, 2 (the *seeds* column says which ran); cells are mean ± sd over the seeds. *final* = the weights
after the last epoch at threshold 0.5: the course's measure. *train acc* is the last epoch's running
accuracy (dropout on). *bal acc / AUC (best)* = the epoch with the best validation ROC AUC at its
validation-tuned threshold: our measure. A note *epoch K of STUDY/SETTING* means the run was read after
epoch K of that longer run: with a constant LR and no early stopping, a K-epoch run *is* the first K
epochs of a longer one (same seed, same batches, same dropout masks), so it is trained once and finished
at K as a K-epoch run would be (`tests/test_experiments.py` checks the weights are equal, bit for bit).
Test split: 187 NORMAL / 622 PNEUMONIA, so predicting PNEUMONIA for every image scores 0.769 accuracy
and 0.5 balanced accuracy."""


def mean_sd(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def val_loss_slope(history: list[dict[str, Any]], first: int = 31, last: int = 50) -> float:
    """Least-squares slope of the validation loss per epoch over epochs FIRST..LAST (the later half if shorter)."""
    rows = [h for h in history if first <= h["epoch"] <= last] or history[len(history) // 2:]
    if len(rows) < 2:
        return float("nan")
    return float(np.polyfit([h["epoch"] for h in rows], [h["val_loss"] for h in rows], 1)[0])


def one_class_epochs(run: dict[str, Any]) -> int:
    """Epochs whose validation accuracy equals answering one class for every image: the plateau of an
    imbalanced set, where a net has not yet learnt anything accuracy can show."""
    val = run["val"]
    if "tp" not in val:
        return 0
    rates = {(val["tp"] + val["fn"]) / val["n"], (val["tn"] + val["fp"]) / val["n"]}
    return sum(any(abs(h["val_accuracy"] - q) < 1e-9 for q in rates) for h in run["history"])


def knob(cfg: dict[str, Any], k: str) -> Any:
    if k in cfg:
        return cfg[k]
    return cfg["arch_args"].get(k, "")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict | list):
        return json.dumps(v).replace("|", "\\|")
    return str(v)


def by_setting(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("setting", setting_of(r["name"])), []).append(r)
    return groups


def study_table(study: str, rows: list[dict[str, Any]]) -> list[str]:
    vary = STUDIES[study].vary
    extra = ["val-loss slope, ep 31-50"] if study == "l2" else []
    cols = ["setting", *vary, "model", "params", "seeds", "train CPU s / epoch", "test inference CPU ms", "train acc",
            "final val acc", "final test acc", "final val loss", "min val loss at epoch", "one-class epochs", *extra,
            "test bal acc (best)", "test AUC (best)", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for setting, runs in by_setting(rows).items():
        c = runs[0]["config"]
        best_epoch = [min(r["history"], key=lambda h: h["val_loss"])["epoch"] for r in runs]
        cells = [setting, *(fmt(knob(c, k)) for k in vary), f"{c['arch']}/{c['head']}@{c['input_size']}px",
                 f"{runs[0]['params']:,}", ",".join(str(r["config"]["seed"]) for r in runs),
                 *(mean_sd([scale * r[k] for r in runs], digits) if k in runs[0] else ""
                   for k, scale, digits in (("train_cpu_seconds_per_epoch", 1, 2),
                                            ("infer_cpu_seconds_test", 1000, 1))),
                 mean_sd([r["train_accuracy"] for r in runs]), mean_sd([r["final_val_accuracy"] for r in runs]),
                 mean_sd([r["final_test_accuracy"] for r in runs]),
                 mean_sd([r["history"][-1]["val_loss"] for r in runs]), mean_sd(best_epoch, 1),
                 mean_sd([one_class_epochs(r) for r in runs], 1)]
        if extra:
            cells.append(mean_sd([val_loss_slope(r["history"]) for r in runs], 5))
        cells += [mean_sd([r["test"]["balanced_accuracy"] for r in runs]),
                  mean_sd([r["test"]["roc_auc"] for r in runs]),
                  "; ".join(sorted({tidy_note(r.get("note", ""), study) for r in runs} - {""}))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tidy_note(note: str, study: str) -> str:
    """One note per setting: 'same run as STUDY/SETTING' (seeds dropped), none for a rerun of the study itself."""
    parts = [p.strip() for p in note.split(",")]
    return ", ".join(p for p in parts if p and not p.startswith(f"same run as {study}/"))


TUNING = "xraynet_tuning"  # the written section on make train's CNN (issue 17)
WRITTEN = re.compile(r"<!-- written: (?P<key>[\w-]+) -->\n(?P<text>.*?)<!-- /written -->", re.S)


def study_section(study: str, entry: dict[str, Any], written: dict[str, str]) -> str:
    s = STUDIES[study]
    title = f"## {study}" + (" (quick, CI-sized)" if entry["quick"] else "")
    lines = [title, "", f"*What it asks:* {s.asks}", ""]
    if s.course:
        lines += [f"*The course:* {s.course}", ""]
    if s.setting:
        lines += [f"*Our setting:* {s.setting}", ""]
    lines += [f"*Reproduce:* `{entry.get('command', '')}` (report written {entry['created']})", ""]
    lines += study_table(study, entry["results"])
    lines += ["", f"![{study}: per-epoch loss and accuracy, train vs val, every seed](plots/{study}_curves.png)", ""]
    text = written.get(study, "*Conclusion:* not written yet.\n")
    lines += [f"<!-- written: {study} -->", text.rstrip("\n"), "<!-- /written -->", ""]
    return "\n".join(lines)


def render(studies: dict[str, dict[str, Any]], written: dict[str, str] | None = None,
           kept: dict[str, tuple[str, str]] | None = None) -> str:
    """The report. KEPT {study: (index line, section)}: published sections of studies with no run data
    here, carried over verbatim (a rerun of one study must not drop the others' tables)."""
    written, kept = written or {}, kept or {}
    head = ["# Experiments: the course's studies at the course's settings", "", INTRO, ""]
    head += ["<!-- written: overview -->", written.get("overview", "").rstrip("\n"), "<!-- /written -->", ""]
    sections = []
    for study in STUDIES:
        if study in studies:
            entry = studies[study]
            quick = " (quick)" if entry["quick"] else ""
            n = len(by_setting(entry["results"]))
            head.append(f"- [{study}](#{study}){quick}: {n} settings, {len(entry['results'])} runs")
            sections.append(study_section(study, entry, written))
        elif study in kept:
            head.append(kept[study][0])
            sections.append(kept[study][1].rstrip("\n") + "\n")
    # How make train's CNN was tuned (our profile, not a course study): written by hand, kept on publish.
    tuning = ["## xraynet: tuning make train's CNN", "", f"<!-- written: {TUNING} -->",
              written.get(TUNING, "*Not written yet.*\n").rstrip("\n"), "<!-- /written -->", ""]
    return "\n".join(head) + "\n\n" + "\n".join(sections) + "\n" + "\n".join(tuning)


def published_sections(text: str) -> dict[str, tuple[str, str]]:
    """A published report's studies: {study: (its index line, its whole section)}."""
    index = {m[1]: m[0] for m in re.finditer(r"^- \[(\w+)\]\(#\w+\).*$", text, re.M)}
    out = {}
    for part in re.split(r"^(?=## )", text, flags=re.M)[1:]:
        study = re.match(r"## (\w+)", part)
        if study and study[1] in STUDIES and study[1] in index:
            out[study[1]] = (index[study[1]], part)
    return out


def load_studies(reports_dir: Path) -> dict[str, dict[str, Any]]:
    found = {p.stem: json.loads(p.read_text()) for p in (reports_dir / "studies").glob("*.json")}
    return {s: found[s] for s in STUDIES if s in found}


def write_report(new: dict[str, dict[str, Any]], reports_dir: Path) -> Path:
    """Store this invocation's studies (one file each), draw their curves, re-render experiments.md/.json."""
    (reports_dir / "studies").mkdir(parents=True, exist_ok=True)
    for study, entry in new.items():
        (reports_dir / "studies" / f"{study}.json").write_text(json.dumps(entry, indent=1))
        panels = {setting: [r["history"] for r in runs] for setting, runs in by_setting(entry["results"]).items()}
        val = entry["results"][0].get("val", {})
        majority = max(val["tp"] + val["fn"], val["tn"] + val["fp"]) / val["n"] if "tp" in val else None
        plot_study_curves(panels, reports_dir / "plots" / f"{study}_curves.png", majority=majority,
                          title=f"{study}: train vs val per epoch ({len(entry['results'])} runs)")
    studies = load_studies(reports_dir)
    (reports_dir / "experiments.json").write_text(json.dumps({"studies": studies}, indent=1))
    out = reports_dir / "experiments.md"
    out.write_text(render(studies))
    return out


def publish(reports_dir: Path, docs_dir: Path) -> Path:
    """REPORTS_DIR's studies -> DOCS_DIR/experiments.md + plots/, keeping the written conclusions there
    and the sections of studies REPORTS_DIR has no data for. The default set is our profile, not a
    course study: its figures are the README's and the tuning section's, so it is not published here."""
    studies = {k: v for k, v in load_studies(reports_dir).items() if k != "default"}
    out = docs_dir / "experiments.md"
    text = out.read_text() if out.is_file() else ""
    written = {m["key"]: m["text"] for m in WRITTEN.finditer(text)}
    (docs_dir / "plots").mkdir(parents=True, exist_ok=True)
    for study in studies:
        shutil.copyfile(reports_dir / "plots" / f"{study}_curves.png", docs_dir / "plots" / f"{study}_curves.png")
    out.write_text(render(studies, written, published_sections(text)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", nargs="+", default=["default"], help=f"default, all, or of {COURSE_STUDIES}")
    p.add_argument("--quick", action="store_true", help="CI-sized variants (one seed)")
    p.add_argument("--only", nargs="+", help="run only these settings or run names")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds per setting (default: 0 1 2; the default set 0)")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--runs-dir", type=Path, default=C.RUNS_DIR)
    p.add_argument("--best-dir", type=Path, default=C.BEST_DIR)
    p.add_argument("--reports-dir", type=Path, default=C.REPORTS_DIR)
    p.add_argument("--reuse", action="store_true", help="reuse a finished run whose config is identical")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: report the finished runs of the plan (implies --reuse)")
    p.add_argument("--publish", type=Path, metavar="DOCS_DIR", help="only copy the report to DOCS_DIR")
    args = p.parse_args(argv)
    args.reuse = args.reuse or args.collect
    if args.publish:
        print(f"published -> {publish(Path(args.reports_dir), args.publish)}")
        return
    studies = [s for name in args.study for s in (COURSE_STUDIES if name == "all" else [name])]
    if unknown := [s for s in studies if s not in STUDIES]:
        p.error(f"unknown study {unknown}; choose from default, all, {COURSE_STUDIES}")
    # Under torchrun (make train NPROC=N) every rank runs every study; rank 0 alone writes.
    d = distributed.init()
    t0, c0 = time.perf_counter(), time.process_time()
    # A run that is the first K epochs of a longer planned one (any study) is read from it: trained once.
    longest = trajectories({s: plan(s, args.quick, args.only, args.seeds) for s in studies})
    for study in studies:
        ts = time.perf_counter()
        results = run_study(study, args, longest)
        if not results or not d.is_main:
            continue
        if study == "default":
            write_best(results, args)
        command = " ".join(["python -m training.experiments --study", study, *(["--quick"] if args.quick else []),
                            *(["--seeds", *map(str, args.seeds)] if args.seeds else []),
                            *(["--only", *args.only] if args.only else [])])
        entry = {"quick": args.quick, "seconds": round(time.perf_counter() - ts, 1), "results": results,
                 "command": command, "created": datetime.now(UTC).isoformat(timespec="seconds")}
        print(f"report -> {write_report({study: entry}, Path(args.reports_dir))}", flush=True)
    distributed.shutdown(d)
    if d.is_main:
        print(f"total {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU (this process)")


if __name__ == "__main__":
    main()
