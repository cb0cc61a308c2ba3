"""Matplotlib figures: training curves, ROC curve, confusion matrix. Torch-free."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, roc_auc_score, roc_curve

from handlers.schemas import CLASS_NAMES


def plot_curves(history: list[dict], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, train vs val; a dashed line at the best epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="val")
    ax_acc.plot(epochs, [h["val_balanced_accuracy"] for h in history], label="val balanced", ls=":")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    best = [h["epoch"] for h in history if h.get("best")]
    for ax in (ax_loss, ax_acc):
        if best:
            ax.axvline(best[-1], color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(y_true: np.ndarray, prob: np.ndarray, path: Path, title: str = "ROC") -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fpr, tpr, _ = roc_curve(y_true, prob)
    # sklearn's own label rounds to 2 decimals: 0.9974 would read "AUC = 1.00".
    auc = roc_auc_score(y_true, prob)
    RocCurveDisplay(fpr=fpr, tpr=tpr, name=f"P(PNEUMONIA), AUC = {auc:.4f}").plot(ax=ax, plot_chance_level=True)
    ax.set(title=title, xlabel="1 - specificity", ylabel="sensitivity")
    return _save(fig, path)


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str = "Confusion matrix") -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=[0, 1], display_labels=list(CLASS_NAMES),
                                            ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title)
    return _save(fig, path)


def plot_bars(labels: list[str], series: dict[str, list[float]], path: Path, title: str, ylabel: str) -> Path:
    """Grouped bars: one group per run, one bar per series (e.g. val and test accuracy)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.8))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_study_curves(panels: dict[str, list[list[dict]]], path: Path, title: str = "",
                      majority: float | None = None) -> Path:
    """One column per setting (e.g. BCE | CE side by side), rows loss and accuracy; train vs val per epoch.

    Each seed is a thin line, the mean over seeds a thick one, so the spread between repeats shows.
    `majority`: the validation accuracy of answering the majority class for every image, drawn as a
    dotted line: an imbalanced set's plateau that accuracy alone does not reveal.
    """
    n = max(1, len(panels))
    fig, axes = plt.subplots(2, n, figsize=(2.9 * n + 1, 5.6), squeeze=False, sharey="row")
    colors = {"train": "tab:blue", "val": "tab:orange"}
    for col, (label, histories) in enumerate(panels.items()):
        for row, metric in enumerate(("loss", "accuracy")):
            ax = axes[row][col]
            for split, color in colors.items():
                key = f"{split}_{metric}"
                curves = [np.array([h[key] for h in hist]) for hist in histories]
                for c in curves:
                    ax.plot(np.arange(1, len(c) + 1), c, color=color, lw=0.6, alpha=0.45)
                shortest = min(len(c) for c in curves)
                mean = np.mean([c[:shortest] for c in curves], axis=0)
                ax.plot(np.arange(1, shortest + 1), mean, color=color, lw=1.8,
                        label=f"{split} (mean of {len(curves)})")
            if row == 1 and majority is not None:
                ax.axhline(majority, color="grey", ls=":", lw=1, label="val, all one class")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(label, fontsize=9)
            else:
                ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    if majority is not None:
        axes[1][0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
