"""One training run: fit, early stop, keep the best checkpoint by a validation score.

    python -m training.train --arch xraynet --head bce --input-size 128 --epochs 12
    python -m training.train --config run.json          # any TrainConfig field; flags override

Writes to OUT_DIR/NAME/: best.pt (loads with torch.load(weights_only=True); carries the
ModelCard that export and serving need), history.json, metrics.json and curves.png.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from handlers.backends import pneumonia_probability
from handlers.schemas import CLASS_NAMES, ModelCard
from training import data as datalib
from training import distributed
from training.metrics import binary_metrics, youden_threshold
from training.models import arch_args, build_model, count_parameters
from training.plots import plot_curves
from training.sources import REPO_ROOT, default_data_dir

CHECKPOINT_FORMAT = 1


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
    select: Literal["roc_auc", "balanced_accuracy", "accuracy", "loss"] = "roc_auc"
    patience: int = Field(default=0, ge=0, description="early-stopping patience in epochs; 0 = off")
    tune_threshold: bool = True
    seed: int = 0
    threads: int = Field(default=0, ge=0, description="torch threads; 0 = torch's default")
    limit_train: int | None = Field(default=None, ge=2, description="stratified subset, for quick runs")
    limit_eval: int | None = Field(default=None, ge=2)
    data_dir: Path = Field(default_factory=default_data_dir)
    out_dir: Path = REPO_ROOT / "artifacts" / "runs"
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
    return torch.nn.CrossEntropyLoss(weight=weight)


def loss_target(cfg: TrainConfig, y: torch.Tensor) -> torch.Tensor:
    return y.float()[:, None] if cfg.head == "bce" else y


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, head: str, batch: int = 256,
            d: distributed.Dist | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """P(pneumonia) for every image (through the serving probability function) and the logits.

    Under torchrun each rank predicts its shard and every rank gets all logits, in order."""
    d = d or distributed.Dist()
    model = distributed.unwrap(model).eval()
    part = x[distributed.shard(len(x), d)]
    # max(.., 1): a rank whose shard is empty still runs once, so that it knows the logits' shape
    logits = torch.cat([model(part[i : i + batch].to(d.device)) for i in range(0, max(len(part), 1), batch)])
    logits = distributed.gather(logits, len(x), d).cpu()
    return pneumonia_probability(logits.numpy(), head), logits


def evaluate(model: torch.nn.Module, split: datalib.Split, cfg: TrainConfig, criterion: torch.nn.Module,
             threshold: float = 0.5, d: distributed.Dist | None = None) -> dict[str, float]:
    device = (d or distributed.Dist()).device
    prob, logits = predict(model, split.x, cfg.head, d=d)
    out = binary_metrics(split.y.numpy(), prob, threshold)
    out["loss"] = float(criterion(logits.to(device), loss_target(cfg, split.y).to(device)))
    return out


def score(metrics: dict[str, float], select: str) -> float:
    return -metrics["loss"] if select == "loss" else metrics[select]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return None


def train(cfg: TrainConfig, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one configuration; return its summary (also written to OUT_DIR/NAME/metrics.json).

    Under torchrun (training/distributed.py) every rank runs this and returns the same summary;
    rank 0 alone writes."""
    d = distributed.init()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    if data is None:
        with distributed.main_first(d):
            data = load_data(cfg)
    train_split, val_split = data["train"], data["val"]
    mean, std = data["stats"]
    args = arch_args(cfg.arch, cfg.arch_args)
    model = build_model(cfg.arch, cfg.head, cfg.input_size, args)
    net = distributed.wrap(model, d)  # the same module; in DDP under torchrun
    criterion = make_criterion(cfg, train_split.y).to(d.device)
    opt = make_optimizer(cfg, net)
    sched = make_scheduler(cfg, opt)
    g = distributed.augment_generator(cfg.seed, d)
    batch_size = distributed.per_rank_batch(cfg.batch_size, d)
    run_dir = Path(cfg.out_dir) / cfg.name
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    history: list[dict[str, Any]] = []
    best_score, best_state, best_epoch, stale = -float("inf"), None, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=cfg.name, disable=False if cfg.progress else None,
               unit="epoch", leave=False) if d.is_main else range(1, cfg.epochs + 1)
    for epoch in bar:
        net.train()
        order = (distributed.train_order(len(train_split), epoch, cfg.seed, d) if d.enabled
                 else torch.randperm(len(train_split), generator=g))
        total_loss, correct = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                continue  # BatchNorm cannot train on a batch of one (all ranks skip alike: equal shards)
            x, y = train_split.x[idx], train_split.y[idx]
            if cfg.augment:
                x = datalib.augment(x, g)
            x, y = x.to(d.device), y.to(d.device)
            logits = net(x)
            loss = criterion(logits, loss_target(cfg, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(idx)
            pred = (logits[:, 0] > 0) if cfg.head == "bce" else logits.argmax(1).bool()
            correct += int((pred.long() == y).sum())
        if sched:
            sched.step()
        total_loss, correct, seen = distributed.sum_all([total_loss, correct, len(order)], d)
        distributed.sync_buffers(net, d)
        val = evaluate(net, val_split, cfg, criterion, d=d)
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": total_loss / seen,
               "train_accuracy": correct / seen, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "val_balanced_accuracy": val["balanced_accuracy"], "val_roc_auc": val["roc_auc"],
               "seconds": time.perf_counter() - t0, "best": False}
        if score(val, cfg.select) > best_score:
            best_score, best_epoch, stale = score(val, cfg.select), epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            row["best"] = True
        else:
            stale += 1
        history.append(row)
        if d.is_main:
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{val['accuracy']:.3f}",
                            val_auc=f"{val['roc_auc']:.3f}")
        if cfg.patience and stale >= cfg.patience:
            break
    train_seconds = time.perf_counter() - t0

    final = {s: evaluate(net, data[s], cfg, criterion, d=d)["accuracy"] for s in ("val", "test")}
    model.load_state_dict(best_state)
    val_prob, _ = predict(model, val_split.x, cfg.head, d=d)
    threshold = youden_threshold(val_split.y.numpy(), val_prob) if cfg.tune_threshold else 0.5
    val_metrics = evaluate(model, val_split, cfg, criterion, threshold, d=d)
    test_metrics = evaluate(model, data["test"], cfg, criterion, threshold, d=d)
    card = ModelCard(name=cfg.name, arch=cfg.arch, arch_args=args, head=cfg.head, input_size=cfg.input_size,
                     mean=mean, std=std, class_names=CLASS_NAMES, threshold=threshold,
                     val_metrics=_floats(val_metrics), test_metrics=_floats(test_metrics), seed=cfg.seed,
                     versions={"torch": torch.__version__})
    checkpoint = {"format": CHECKPOINT_FORMAT, "card": card.model_dump(mode="json"),
                  "config": cfg.model_dump(mode="json"), "state_dict": best_state, "history": history,
                  "world_size": d.world_size}
    result = {"name": cfg.name, "config": cfg.model_dump(mode="json"), "params": count_parameters(model),
              "train_seconds": round(train_seconds, 2), "epochs_run": len(history), "best_epoch": best_epoch,
              "threshold": threshold, "val": val_metrics, "test": test_metrics,
              "final_val_accuracy": final["val"], "final_test_accuracy": final["test"],
              "best_val_accuracy_at_0.5": next(h["val_accuracy"] for h in history if h["epoch"] == best_epoch),
              "checkpoint": str(run_dir / "best.pt"), "world_size": d.world_size}
    if d.is_main:
        torch.save(checkpoint, run_dir / "best.pt")
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
        plot_curves(history, run_dir / "curves.png", title=f"{cfg.name}: {cfg.arch}/{cfg.head} @{cfg.input_size}px")
    distributed.barrier(d)  # the other ranks may read what rank 0 wrote (make train reads history.json)
    return result


def _floats(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, int | float)}


def load_checkpoint(path: str | Path) -> tuple[ModelCard, torch.nn.Module, dict[str, Any]]:
    """A best.pt -> (card, model in eval mode, the whole checkpoint). Never unpickles code."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an xray-serve checkpoint (format {ckpt.get('format')!r})")
    card = ModelCard.model_validate(ckpt["card"])
    model = build_model(card.arch, card.head, card.input_size, card.arch_args)
    model.load_state_dict(ckpt["state_dict"])
    return card, model.eval(), ckpt


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
