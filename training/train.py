"""One training run, read top to bottom as torchvision's classification reference:
train_one_epoch, evaluate, then finish (threshold, card, checkpoint, history, curves).

    python -m training.train --arch xraynet --head bce --input-size 128 --epochs 12
    torchrun --nproc_per_node N -m training.train ...   # data-parallel (training/distributed.py)
    python -m training.train --config run.json          # any TrainConfig field; flags override

Writes to OUT_DIR/NAME/: best.pt (loads with torch.load(weights_only=True); carries the
ModelCard that export and serving need), history.json, metrics.json and curves.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from handlers.backends import pneumonia_probability
from handlers.constants import RUNS_DIR
from handlers.schemas import CLASS_NAMES, Calibration, ModelCard
from handlers.trust import calibrated, margin_of
from training import data as datalib
from training import distributed, trust
from training.checkpoint import save_checkpoint
from training.metrics import binary_metrics
from training.models import arch_args, build_model, count_parameters
from training.plots import plot_curves
from training.sources import default_data_dir


class TrainConfig(BaseModel):
    """Every knob of a run; validated, and stored in the checkpoint."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = "run"
    arch: str = "xraynet"
    arch_args: dict[str, Any] = Field(default_factory=dict, description="e.g. {'dropout': 0.7, 'pool': 4}")
    head: Literal["bce", "ce"] = "bce"
    input_size: int = Field(default=128, ge=8, le=512)
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=1e-4, ge=0, description="L2 for adam/sgd, decoupled for adamw")
    scheduler: Literal["none", "step", "cosine"] = "cosine"
    step_size: int = Field(default=5, ge=1)
    gamma: float = Field(default=0.5, gt=0)
    balance: Literal["loss", "none"] = "loss"
    augment: bool = True
    ema: float = Field(default=0.0, ge=0, lt=1, description="EMA decay of the weights per step; 0 = off")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="training forward pass under bfloat16 autocast; evaluation stays fp32")
    select: Literal["roc_auc", "balanced_accuracy", "accuracy", "loss"] = "roc_auc"
    patience: int = Field(default=0, ge=0, description="early-stopping patience in epochs; 0 = off")
    tune_threshold: bool = True
    ood_gate: bool = Field(default=True, description="fit the OOD detector (the served gate) when finishing")
    seed: int = 0
    threads: int = Field(default=0, ge=0, description="torch threads; 0 = torch's default")
    limit_train: int | None = Field(default=None, ge=2, description="stratified subset, for quick runs")
    limit_eval: int | None = Field(default=None, ge=2)
    data_dir: Path = Field(default_factory=default_data_dir)
    out_dir: Path = RUNS_DIR
    progress: bool | None = None  # None: a bar on a terminal only


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_data(cfg: TrainConfig) -> dict[str, datalib.Split]:
    """Train/val/test at the run's size, normalised with the train split's statistics."""
    raw = {s: datalib.load_split(cfg.data_dir, s, cfg.input_size) for s in ("train", "val", "test")}
    if cfg.limit_train:
        raw["train"] = raw["train"].subset(cfg.limit_train, cfg.seed)
    if cfg.limit_eval:
        raw["val"], raw["test"] = raw["val"].subset(cfg.limit_eval), raw["test"].subset(cfg.limit_eval)
    mean, std = datalib.norm_stats(raw["train"].x)
    return {s: datalib.normalized(split, mean, std) for s, split in raw.items()} | {"stats": (mean, std)}


def make_criterion(cfg: TrainConfig, y_train: torch.Tensor) -> torch.nn.Module:
    counts = torch.bincount(y_train, minlength=2).float().clamp(min=1)
    if cfg.head == "bce":
        pos_weight = counts[0] / counts[1] if cfg.balance == "loss" else torch.tensor(1.0)
        return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight.reshape(1))
    weight = counts.sum() / (2 * counts) if cfg.balance == "loss" else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def loss_target(cfg: TrainConfig, y: torch.Tensor, smooth: bool = False) -> torch.Tensor:
    """The criterion's target; SMOOTH (training only) pulls a BCE target towards 0.5 by label_smoothing."""
    if cfg.head == "ce":
        return y
    t = y.float()[:, None]
    return t * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing if smooth else t


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, head: str, batch: int = 256,
            d: distributed.Dist | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """P(pneumonia) for every image (through the serving probability function) and the logits.
    Under torchrun each rank predicts its shard and every rank gets all the logits, in order."""
    d = d or distributed.Dist()
    model = distributed.unwrap(model).eval()
    part = x[distributed.shard(len(x), d)]
    # max(.., 1): a rank with an empty shard still runs once, so that it knows the logits' shape
    logits = torch.cat([model(part[i : i + batch].to(d.device)) for i in range(0, max(len(part), 1), batch)])
    logits = distributed.gather(logits, len(x), d).cpu()
    return pneumonia_probability(logits.numpy(), head), logits


def evaluate(model: torch.nn.Module, split: datalib.Split, cfg: TrainConfig, criterion: torch.nn.Module,
             threshold: float = 0.5, calibration: Calibration | None = None,
             d: distributed.Dist | None = None) -> dict[str, float]:
    """Metrics at THRESHOLD on the probability the server gives: calibrated when CALIBRATION is given."""
    device = (d or distributed.Dist()).device
    prob, logits = predict(model, split.x, cfg.head, d=d)
    if calibration is not None:
        prob = calibrated(margin_of(logits.cpu().numpy(), cfg.head), calibration)
    out = binary_metrics(split.y.numpy(), prob, threshold)
    out["loss"] = float(criterion(logits.to(device), loss_target(cfg, split.y).to(device)))
    return out


def score(metrics: dict[str, float], select: str) -> float:
    return -metrics["loss"] if select == "loss" else metrics[select]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Fused: one kernel a step instead of ~10 passes over the weights. The course ANN at 256 px has
    # 2.1 M weights: 2x faster epochs at batch 32, 4x at batch 2 (measured). AdamW stays as it was, so
    # the tuned profile's published figures rerun bit for bit.
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return None


def ema_step(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """AveragedModel's update for an exponential moving average whose decay ramps up as
    min(DECAY, (1 + n) / (10 + n)) after n steps (TensorFlow's ExponentialMovingAverage with
    num_updates): the random initial weights never dominate a short run, and a long run's average
    covers about its last tenth until the window reaches 1 / (1 - DECAY) steps."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():  # BatchNorm's step counter
            return current
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        return averaged.lerp(current, 1 - d)

    return avg


def training_loss(criterion: torch.nn.Module, logits: torch.Tensor, y: torch.Tensor,
                  cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a training batch, and the logits its accuracy is read from. An ensemble in training
    gives [N, members, out]: every member is scored against the labels on its own (the mean of their
    losses), so each learns as it would alone; its accuracy is the mean logit's, as served."""
    if logits.dim() == 3:
        members = logits.shape[1]
        return criterion(logits.flatten(0, 1), loss_target(cfg, y.repeat_interleave(members), smooth=True)), \
            logits.mean(1)
    return criterion(logits, loss_target(cfg, y, smooth=True)), logits


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    split: datalib.Split, cfg: TrainConfig, generator: torch.Generator, epoch: int = 1,
                    d: distributed.Dist | None = None, ema: AveragedModel | None = None) -> dict[str, float]:
    """One pass over the shuffled train split; the running loss and accuracy (dropout, augmentation on).
    EMA, when given, follows the weights and BatchNorm statistics after every step.
    Under torchrun: this rank's share of the split (DistributedSampler), batch_size / N images a
    step, loss and accuracy summed over all ranks."""
    d = d or distributed.Dist()
    model.train()
    order = (distributed.train_order(len(split), epoch, cfg.seed, d) if d.enabled
             else torch.randperm(len(split), generator=generator))
    batch_size = distributed.per_rank_batch(cfg.batch_size, d)
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    total_loss, correct = 0.0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if len(idx) < 2 and has_batchnorm:
            continue  # BatchNorm cannot train on a batch of one (every rank alike: equal shares)
        x, y = split.x[idx], split.y[idx]
        if cfg.augment:
            x = datalib.augment(x, generator)
        x, y = x.to(d.device), y.to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits = model(x)
        loss, logits = training_loss(criterion, logits.float(), y, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(distributed.unwrap(model))
        total_loss += float(loss.detach()) * len(idx)
        pred = (logits[:, 0] > 0) if cfg.head == "bce" else logits.argmax(1).bool()
        correct += int((pred.long() == y).sum())
    total_loss, correct, seen = distributed.sum_all([total_loss, correct, len(order)], d)
    distributed.sync_buffers(model, d)  # rank 0's BatchNorm statistics everywhere before evaluating
    return {"train_loss": total_loss / seen, "train_accuracy": correct / seen}


def make_card(cfg: TrainConfig, args: dict[str, Any], stats: tuple[float, float], fitted: trust.TrustFit,
              val_metrics: dict[str, Any], test_metrics: dict[str, Any]) -> ModelCard:
    mean, std = stats
    return ModelCard(name=cfg.name, arch=cfg.arch, arch_args=args, head=cfg.head, input_size=cfg.input_size,
                     mean=mean, std=std, class_names=CLASS_NAMES,
                     val_metrics=_floats(val_metrics), test_metrics=_floats(test_metrics), seed=cfg.seed,
                     versions={"torch": torch.__version__}, **fitted.card_fields())


def write_run(run_dir: Path, cfg: TrainConfig, history: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """history.json, metrics.json and curves.png beside the checkpoint."""
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    plot_curves(history, run_dir / "curves.png", title=f"{cfg.name}: {cfg.arch}/{cfg.head} @{cfg.input_size}px")


def finish(model: torch.nn.Module, best: dict[str, Any], history: list[dict[str, Any]], data: dict[str, Any],
           cfg: TrainConfig, criterion: torch.nn.Module, train_seconds: float,
           d: distributed.Dist | None = None) -> dict[str, Any]:
    """After the last epoch: the final weights' accuracy, then for the best weights the OOD detector,
    calibration and operating points (training/trust.py), card, checkpoint, history and curves.
    Returns the run's summary (metrics.json), history included. Under torchrun every rank computes
    the same summary (the same full splits); rank 0 alone writes."""
    d = d or distributed.Dist()
    final = {s: evaluate(model, data[s], cfg, criterion, d=d)["accuracy"] for s in ("val", "test")}
    model = distributed.unwrap(model)
    model.load_state_dict(best["state"])
    # The card's threshold is the default point's, on the calibrated probability the server gives.
    fitted = trust.fit(model, data, cfg.head, tune=cfg.tune_threshold, detector=cfg.ood_gate)
    threshold = fitted.threshold
    val_metrics = evaluate(model, data["val"], cfg, criterion, threshold, fitted.calibration, d)
    test_metrics = evaluate(model, data["test"], cfg, criterion, threshold, fitted.calibration, d)
    args = arch_args(cfg.arch, cfg.arch_args)
    card = make_card(cfg, args, data["stats"], fitted, val_metrics, test_metrics)
    run_dir = Path(cfg.out_dir) / cfg.name
    ckpt = run_dir / "best.pt"
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt, card, cfg.model_dump(mode="json"), best["state"], history, ood=fitted.ood_state)
    result = {"name": cfg.name, "config": cfg.model_dump(mode="json"), "params": count_parameters(model),
              "train_seconds": round(train_seconds, 2), "epochs_run": len(history), "best_epoch": best["epoch"],
              "threshold": threshold, "val": val_metrics, "test": test_metrics,
              "final_val_accuracy": final["val"], "final_test_accuracy": final["test"],
              "best_val_accuracy_at_0.5": next(h["val_accuracy"] for h in history if h["epoch"] == best["epoch"]),
              "trust": trust.summary(fitted, model, data, cfg.head), "checkpoint": str(ckpt),
              "world_size": d.world_size}
    if d.is_main:
        write_run(run_dir, cfg, history, result)
    distributed.barrier(d)  # what rank 0 wrote exists for every rank once this returns
    return result | {"history": history}


def train(cfg: TrainConfig, data: dict[str, Any] | None = None,
          snapshots: dict[int, TrainConfig] | None = None) -> dict[str, Any]:
    """Run one configuration: seed, fit with early stopping on the validation score, finish.
    Returns the summary written to OUT_DIR/NAME/metrics.json, plus the per-epoch "history".
    Under torchrun (training/distributed.py) every rank runs this, in DistributedDataParallel.

    SNAPSHOTS {epoch k: config}: also finish, after epoch k, the run that config names (its own
    out_dir/name, epochs k), and return those summaries under "snapshots". Without early stopping,
    a k-epoch run is exactly the first k epochs of a longer one (the per-epoch random streams do not
    depend on the epoch count), so this is that run, bit for bit, trained once. The random states
    are restored after each snapshot's finishing step, so the long run goes on as if none was taken."""
    snapshots = snapshots or {}
    if snapshots and (cfg.patience or cfg.scheduler == "cosine" or max(snapshots) >= cfg.epochs):
        raise ValueError("snapshots need no early stopping, an epoch-count-free schedule and epochs < cfg.epochs")
    d = distributed.init()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    if data is None:
        with distributed.main_first(d):  # rank 0 fills the decode cache, the others read it
            data = load_data(cfg)
    model = build_model(cfg.arch, cfg.head, cfg.input_size, arch_args(cfg.arch, cfg.arch_args))
    model = distributed.wrap(model, d)
    criterion = make_criterion(cfg, data["train"].y).to(d.device)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    generator = distributed.augment_generator(cfg.seed, d)
    # An exponential moving average of the weights (and BatchNorm statistics): the epoch-to-epoch
    # swings of a small batch's BatchNorm average out, so validation picks a steadier model. When on,
    # it is the model that is validated, selected and shipped.
    ema = AveragedModel(distributed.unwrap(model), avg_fn=ema_step(cfg.ema), use_buffers=True) if cfg.ema else None
    judged = ema.module if ema is not None else model

    history: list[dict[str, Any]] = []
    snaps: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": -float("inf"), "state": None, "epoch": 0}
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=cfg.name, disable=False if cfg.progress else None,
               unit="epoch", leave=False) if d.is_main else range(1, cfg.epochs + 1)
    for epoch in bar:
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row |= train_one_epoch(model, criterion, optimizer, data["train"], cfg, generator, epoch, d, ema)
        if scheduler:
            scheduler.step()
        if ema is not None:
            distributed.sync_buffers(ema.module, d)  # each rank's EMA followed its own BatchNorm statistics
        val = evaluate(judged, data["val"], cfg, criterion, d=d)
        row |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "val_balanced_accuracy": val["balanced_accuracy"], "val_roc_auc": val["roc_auc"],
                "seconds": time.perf_counter() - t0, "best": score(val, cfg.select) > best["score"]}
        if row["best"]:
            best = {"score": score(val, cfg.select), "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in distributed.unwrap(judged).state_dict().items()}}
        history.append(row)
        if d.is_main:
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{val['accuracy']:.3f}",
                            val_auc=f"{val['roc_auc']:.3f}")
        if epoch in snapshots:
            paused = time.perf_counter()
            states = torch.get_rng_state(), np.random.get_state(), random.getstate()
            snaps.append(finish(copy.deepcopy(distributed.unwrap(judged)), best, list(history), data,
                                snapshots[epoch], criterion, paused - t0, d))
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])
            t0 += time.perf_counter() - paused  # the snapshot's finishing is not the long run's training time
        if cfg.patience and epoch - best["epoch"] >= cfg.patience:
            break
    return finish(judged, best, history, data, cfg, criterion, time.perf_counter() - t0, d) | {"snapshots": snaps}


def _floats(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, int | float)}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="JSON (or YAML) file of TrainConfig fields")
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "arch_args":
            p.add_argument(flag, type=json.loads, help="JSON object, e.g. '{\"dropout\": 0.7}'")
        elif field.annotation in (bool, bool | None):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, default=None, help=field.description)
    ns = p.parse_args(argv)
    fields: dict[str, Any] = {}
    if ns.config:
        text = ns.config.read_text()
        if ns.config.suffix in (".yaml", ".yml"):
            import yaml

            fields.update(yaml.safe_load(text))
        else:
            fields.update(json.loads(text))
    fields.update({k: v for k, v in vars(ns).items() if k != "config" and v is not None})
    return TrainConfig.model_validate(fields)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    d = distributed.init()
    result = train(cfg)
    distributed.shutdown(d)
    if not d.is_main:
        return
    v, t = result["val"], result["test"]
    print(f"{cfg.name}: {result['epochs_run']} epochs in {result['train_seconds']:.0f}s, best epoch "
          f"{result['best_epoch']}, threshold {result['threshold']:.3f}\n"
          f"  val  acc {v['accuracy']:.4f} bal {v['balanced_accuracy']:.4f} auc {v['roc_auc']:.4f}\n"
          f"  test acc {t['accuracy']:.4f} bal {t['balanced_accuracy']:.4f} auc {t['roc_auc']:.4f} "
          f"sens {t['sensitivity']:.4f} spec {t['specificity']:.4f}\n  -> {result['checkpoint']}")


if __name__ == "__main__":
    main()
