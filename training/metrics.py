"""Binary metrics that clinicians read, from scikit-learn. Torch-free: the client uses it too.

Positive class = PNEUMONIA (label 1). Sensitivity = recall of PNEUMONIA, specificity =
recall of NORMAL.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def youden_threshold(y_true: np.ndarray, prob: np.ndarray) -> float:
    """The threshold on P(pneumonia) that maximises sensitivity + specificity - 1."""
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y_true, prob)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 0.0, 1.0))


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, balanced accuracy, sensitivity, specificity, precision, F1, ROC AUC, confusion."""
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    y_pred = (prob >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both = len(np.unique(y_true)) == 2
    return {
        "n": len(y_true),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)) if both else float("nan"),
        "sensitivity": float(skm.recall_score(y_true, y_pred, pos_label=1, zero_division=0)),
        "specificity": float(skm.recall_score(y_true, y_pred, pos_label=0, zero_division=0)),
        "precision": float(skm.precision_score(y_true, y_pred, pos_label=1, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, pos_label=1, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, prob)) if both else float("nan"),
        "tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp),
    }
